"""Mutation testing, one module at a time: does a real bug in MODULE make its own tests fail?

    pip install -e ".[test,mutation]"
    python tools/mutate.py session/context.py [MORE ...]     # or --list, or --all

For each module named in pyproject's [tool.companion.mutation], a copy of the project goes to
.mutation/<module>/ with [tool.mutmut] narrowed to that module and its test files; mutmut 3 puts each of
its bugs (mutants) in, one at a time, and runs the tests that reach the mutated function. The summary
line gives killed / survived / the rest, the score and how long it took. Inspect a survivor with
``cd .mutation/<module> && mutmut show NAME``. docs/testing.md lists the scores and the equivalent mutants.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(os.environ.get("MUTATE_ROOT", Path(__file__).resolve().parents[1]))  # another checkout: its "before"
COPIED = ["companion", "tests", "config", "clone_files", "README.md", "LICENSE"]


def modules() -> dict[str, list[str]]:
    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return dict(data["tool"]["companion"]["mutation"])


def workdir(module: str) -> Path:
    return ROOT / ".mutation" / module.removesuffix(".py").replace("/", ".")


def prepare(module: str, tests: list[str]) -> Path:
    """A fresh copy of the project whose [tool.mutmut] mutates ``module`` and runs ``tests``."""
    work = workdir(module)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, work / name)
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    narrowed = (f'only_mutate = ["companion/{module}"]\n'
                f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"'))
    text = text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + narrowed, 1)
    (work / "pyproject.toml").write_text(text)
    return work


def run(module: str, tests: list[str], children: int, only: list[str] | None = None) -> dict[str, int | float | str]:
    missing = [t for t in tests if t.startswith("tests/") and not (ROOT / t).exists()]
    if missing:
        print(f"{module}: no {', '.join(missing)} here; running without", flush=True)
    tests = [t for t in tests if t not in missing]
    work = prepare(module, tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    start = time.monotonic()
    log = (work / "run.log").open("w")
    subprocess.run([mutmut, "run", "--max-children", str(children), *(only or [])], cwd=work, env=env, stdout=log,
                   stderr=subprocess.STDOUT, check=False)
    took = time.monotonic() - start
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                         text=True, check=False).stdout
    counts: dict[str, int] = {}
    for status in re.findall(r":\s*(\w[\w ]*)$", out, re.M):
        counts[status.strip()] = counts.get(status.strip(), 0) + 1
    (work / "results.txt").write_text(out)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    survived = counts.get("survived", 0) + counts.get("no tests", 0)  # no test reaches it: it survives too
    equivalent = write_survivors(work, out, mutmut, env)
    score = 100.0 * killed / max(killed + survived, 1)
    real = 100.0 * killed / max(killed + survived - equivalent, 1)
    return {"module": module, "killed": killed, "survived": survived, "equivalent": equivalent,
            "other": sum(counts.values()) - killed - survived, "score": round(score, 1),
            "score_non_equivalent": round(real, 1), "minutes": round(took / 60, 1), "counts": str(counts)}


SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|PRAGMA|CREATE|DROP|ALTER|VALUES|FROM|WHERE|ORDER|AND|\(SELECT)\b", re.I)


def sql_case_only(removed: list[str], added: list[str]) -> bool:
    """A mutant that only changes the letter case of SQL text: SQL keywords and (unquoted) names are
    case-insensitive, so the database does the same thing (an equivalent mutant)."""
    if len(removed) != 1 or len(added) != 1:
        return False
    literal = re.compile(r'"([^"]*)"')
    if literal.sub('""', removed[0]) != literal.sub('""', added[0]):  # the code around the strings changed
        return False
    before, after = literal.findall(removed[0]), literal.findall(added[0])
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    quoted = re.compile(r"'[^']*'")  # SQL string values: their case matters
    return bool(changed) and all(b.lower() == a.lower() and SQL.match(b) and quoted.findall(b) == quoted.findall(a)
                                 for b, a in changed)  # fmt: skip


def write_survivors(work: Path, results: str, mutmut: str, env: dict[str, str]) -> int:
    """Every survivor's change into survivors.txt (marked when equivalent by rule); returns how many
    are equivalent by that rule."""
    names = re.findall(r"^\s*(\S+): (?:survived|no tests)$", results, re.M)
    equivalent = 0
    lines: list[str] = []
    for name in names:
        diff = subprocess.run([mutmut, "show", name], cwd=work, env=env, capture_output=True, text=True,
                              check=False).stdout.splitlines()
        removed = [d[1:] for d in diff if d.startswith("-") and not d.startswith("---")]
        added = [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++")]
        same = sql_case_only(removed, added)
        equivalent += same
        lines += [f"## {name}" + ("  [equivalent: SQL letter case]" if same else "")]
        lines += [f"-{r}" for r in removed] + [f"+{a}" for a in added]
    (work / "survivors.txt").write_text("\n".join(lines) + "\n")
    return equivalent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mutation testing of one module against its own tests")
    parser.add_argument("module", nargs="*", help="a module of [tool.companion.mutation], e.g. session/context.py")
    parser.add_argument("--all", action="store_true", help="every listed module, one after another (hours)")
    parser.add_argument("--list", action="store_true", help="the modules and their test files")
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once (default 1: a shared machine)")
    parser.add_argument("--tests", nargs="+", help="these test files instead of the module's (an older checkout's)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="only the mutants these names match (fnmatch, e.g. '*_speak_segment*'): one function's")
    args = parser.parse_args(argv)
    table = modules()
    if args.list:
        for module, tests in table.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    chosen = list(table) if args.all else args.module
    unknown = [m for m in chosen if m not in table]
    if unknown or not chosen:
        parser.error(f"name modules from --list (unknown: {', '.join(unknown) or 'none given'})")
    for module in chosen:
        r = run(module, args.tests or table[module], args.children, args.only)
        print(f"{r['module']}: killed {r['killed']}, survived {r['survived']} (with those no test reaches; "
              f"{r['equivalent']} equivalent by rule), other {r['other']} ({r['counts']}); score {r['score']} %, "
              f"{r['score_non_equivalent']} % of the non-equivalent; {r['minutes']} min "
              f"(survivors: {workdir(module)}/survivors.txt)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
