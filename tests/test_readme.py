"""The README's Use section, run as written: every `$ companion ...` line, in order, in a fresh
COMPANION_HOME, with the tiny checkpoint as the default model (COMPANION_MODEL). The `you›` lines after
`companion chat` are typed into it through stdin. Each line must do what the README says it does."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from companion.repl.app import PROMPT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.slow


def use_section() -> list[tuple[str, str]]:
    """(shell line, what is typed into it) for each `$ companion` line of the Use section's example."""
    section = README.split("\n## Use\n")[1].split("\n## ")[0]
    block = section.split("```text\n")[1].split("```")[0]
    steps: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], ""))
        elif line.startswith(PROMPT):
            command, typed = steps[-1]
            steps[-1] = (command, typed + line[len(PROMPT):] + "\n")
        else:
            raise AssertionError(f"a line in the README's example that is neither a command nor typed: {line!r}")
    return steps


def test_the_example_shows_the_real_prompt() -> None:
    section = README.split("\n## Use\n")[1]
    assert PROMPT in section and not re.search(r"^\w+> ", section, re.M)


def test_setup_says_how_to_avoid_the_cuda_download_and_what_a_first_run_fetches() -> None:
    setup = README.split("\n## Set up\n")[1].split("\n## ")[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in " ".join(setup.split())
    assert "pulls the CUDA build" in " ".join(setup.split())
    assert "downloads the model (several GB" in " ".join(setup.split())


@pytest.fixture
def shell_env(tmp_path: Path, companion_home: Path, tiny_model_dir: Path) -> dict[str, str]:
    """`companion` on PATH running this checkout; no audio server (replies become WAV files)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "companion"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m companion "$@"\n', encoding="utf-8")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", COMPANION_MODEL=str(tiny_model_dir),
               PULSE_SERVER="unix:/nonexistent/native", PYTHONPATH=str(ROOT), COLUMNS="200")
    return env


def test_every_line_of_the_use_section(tmp_path: Path, companion_home: Path, shell_env: dict[str, str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "clone_files").symlink_to(ROOT / "clone_files")  # the README runs from the source tree
    steps = use_section()
    assert [command.split("#")[0].split()[:3] for command, _ in steps] == [
        ["companion", "voice", "list"], ["companion", "voice", "add"], ["companion", "chat", "--voice"],
        ["echo", '"Read', "this"], ["companion", "say", '"Good'],
    ]
    results = []
    for command, typed in steps:
        out = subprocess.run(["bash", "-c", command], input=typed, capture_output=True, text=True, env=shell_env,
                             cwd=work, timeout=900)
        print(f"$ {command}\n{out.stdout}{out.stderr}")
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "error:" not in out.stdout + out.stderr
        results.append(out.stdout + out.stderr)
    listed, added, chat, piped, said = results

    assert re.search(r"│ narrator\s+│.*│ example\s+│ ok", listed)  # the shipped example, usable
    assert "added voice 'reader'" in added
    assert re.search(r"memory: the reference takes \d+ of 4096 positions; 312 are kept for each reply; \d+ are left", added)

    assert "✓ voice: narrator" in chat and "✓ context cleared" in chat
    audio, rate = sf.read(str(work / "reply.wav"), dtype="float32")  # /save reply.wav: the last reply
    assert rate == 24000 and len(audio) > 0
    assert chat.count("♪ ") == 1  # one line spoken; the rest were commands

    assert "voice: default (no --voice given" in piped and "♪ " in piped  # it says which voice speaks
    assert "wrote " in said and "to morning.wav" in said
    audio, rate = sf.read(str(work / "morning.wav"), dtype="float32")
    assert rate == 24000 and len(audio) > 0
