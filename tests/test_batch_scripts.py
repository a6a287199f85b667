"""`companion batch` with several scripts (issue 21): each into a folder of its own, rendered at the
same time, on the tiny checkpoint through the real entry point (in this process, so that the engine
can be watched: the first line of each script waits at a barrier inside the engine's call until the
other script's first line is there too, which only a batch that renders them at once gets past)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from test_batch import _setup as batch_setup

from companion.cli import main
from companion.store import Store

# Streams generated together match streams generated alone to 1e-4 (float32 rounding of the batched
# matrix products), plus one step of the 16-bit WAV.
TOLERANCE = 1e-4 + 1 / 32767
BARRIER_LIMIT_S = 120  # a generous bound on waiting for the other script (never a pass/fail threshold)

CHAPTER_ONE = "Good morning.\nguest16: Morning to you.\nHow did you sleep?\n"
CHAPTER_TWO = "guest16: It was late.\n$CLEAR$\nThe rain stopped.\nYes. || No.\n"


@pytest.fixture
def setup(data_dir: Path) -> None:
    """Two voices, short segments, a small context, and two replies generated together."""
    batch_setup(data_dir, "engine:\n  max_batch: 2\n")


@pytest.fixture
def scripts(tmp_path: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text(CHAPTER_ONE)
    two.write_text(CHAPTER_TWO)
    return one, two


@pytest.fixture
def together(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """While the returned list holds [2], each script thread's first call into the engine waits for the
    other's (a BrokenBarrierError fails the script when they do not meet)."""
    from companion.engine import Engine

    original = Engine.stream
    wanted: list[int] = []
    met: set[int] = set()
    barrier: list[threading.Barrier] = []

    def stream(self: Engine, *args: Any, **kwargs: Any) -> Any:
        if wanted and threading.get_ident() not in met:
            met.add(threading.get_ident())
            if not barrier:
                barrier.append(threading.Barrier(wanted[0], timeout=BARRIER_LIMIT_S))
            barrier[0].wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "stream", stream)
    yield wanted


def _batch(model: Path, *args: str) -> int:
    return main(["batch", *args, "--model", str(model), "--voice", "guest", "--seed", "5"])


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _same_audio(a: Path, b: Path) -> None:
    """The same WAV files (names, lengths, samples to TOLERANCE) in both folders."""
    names = sorted(p.name for p in a.glob("*.wav"))
    assert names == sorted(p.name for p in b.glob("*.wav")) and "conversation.wav" in names
    for name in names:
        x, y = sf.read(str(a / name), dtype="float32")[0], sf.read(str(b / name), dtype="float32")[0]
        assert x.shape == y.shape and np.abs(x - y).max() <= TOLERANCE, name


def _alone(model: Path, script: Path, out: Path) -> Path:
    assert _batch(model, str(script), "-o", str(out), "--no-history") == 0
    return out


def test_two_scripts_rendered_at_once_sound_as_each_alone(setup: None, tiny_model_dir: Path, tmp_path: Path,
                                                          scripts: tuple[Path, Path], together: list[int],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    one, two = scripts
    alone = [_alone(tiny_model_dir, s, tmp_path / f"alone-{s.stem}") for s in scripts]
    capsys.readouterr()
    together.append(2)  # from here, both scripts must be in the engine at once
    out = tmp_path / "book"
    assert _batch(tiny_model_dir, str(one), str(two), "-o", str(out)) == 0
    err = capsys.readouterr()
    assert "rendering 2 scripts" in err.err and "6/6" in err.err  # one bar over all six spoken lines
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    for script, solo in zip(scripts, alone, strict=True):
        folder = out / script.stem
        _same_audio(folder, solo)
        made, single = _manifest(folder), _manifest(solo)
        assert made["complete"] and made["lines"] == single["lines"]  # same files, voices, seeds, hashes, seconds
        assert f"to {folder}; history conversation {made['history']}" in err.out
    with Store() as store:  # each script its own conversation, its lines in order
        for script in scripts:
            sid = _manifest(out / script.stem)["history"]
            spoken = " ".join(t.text for t in store.turns(sid) if t.kind == "turn")  # one turn per segment
            assert spoken == " ".join(e["spoken"] for e in _manifest(out / script.stem)["lines"] if not e["clear"])
    together.clear()
    one_line = tmp_path / "single"
    assert _batch(tiny_model_dir, str(one), "-o", str(one_line), "--no-history") == 0  # one script: no subfolder
    assert (one_line / "manifest.json").is_file() and not (one_line / "one").exists()


def test_a_script_that_fails_leaves_the_other_whole_and_resumes_alone(
        setup: None, tiny_model_dir: Path, tmp_path: Path, scripts: tuple[Path, Path], together: list[int],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Script two cannot write its second line's take (a folder stands in its place): it stops there with
    one line saying so; script one is rendered whole, exactly as alone; a rerun finishes script two only."""
    one, two = scripts
    alone = [_alone(tiny_model_dir, s, tmp_path / f"alone-{s.stem}") for s in scripts]
    out = tmp_path / "book"
    blocker = out / "two" / ".takes" / "002.safetensors"
    blocker.mkdir(parents=True)
    capsys.readouterr()
    together.append(2)
    assert _batch(tiny_model_dir, str(one), str(two), "-o", str(out), "--force", "--no-history") == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(two) in errors[0] and "1 of its 3 lines are rendered" in errors[0], err
    _same_audio(out / "one", alone[0])
    stopped = _manifest(out / "two")
    assert not stopped["complete"] and [e["done"] for e in stopped["lines"]] == [True, False, False, False]
    assert all((out / "two" / e[k]).is_file() for e in stopped["lines"] if e["done"] and not e["clear"]
               for k in ("file", "take"))
    blocker.rmdir()
    together.clear()  # one script is left: it is rendered alone
    assert _batch(tiny_model_dir, str(one), str(two), "-o", str(out), "--no-history") == 0
    again = capsys.readouterr()
    assert _words(f"nothing to render: all 3 lines in {out / 'one'} are up to date") in _words(again.out)
    assert _words(f"skipped 1 lines already rendered in {out / 'two'}") in _words(again.err)
    _same_audio(out / "two", alone[1])
    assert _manifest(out / "two")["lines"] == _manifest(alone[1])["lines"]


def _words(text: str) -> str:
    """``text`` without its spaces and line breaks: the console wraps long paths anywhere, even inside a word."""
    return "".join(text.split())


@pytest.mark.parametrize("second", ["sub/one.txt", "ONE.txt", "one.txt"])
def test_two_scripts_with_one_name_are_refused_before_any_work(setup: None, tmp_path: Path, second: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "one.txt"
    first.write_text("Hi.\n")
    other = tmp_path / second
    other.parent.mkdir(exist_ok=True)
    other.write_text("Hello.\n")
    out = tmp_path / "out"
    assert main(["batch", str(first), str(other), "-o", str(out), "--model", "no-model-here"]) == 1
    err = capsys.readouterr().err.strip()
    wanted = "is given twice: give each script once" if second == "one.txt" else "rename one of them"
    assert err.startswith("error: ") and "\n" not in err and wanted in err, err
    assert not out.exists()


def test_a_folder_holding_one_script_is_not_mixed_with_several(setup: None, tmp_path: Path, scripts: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    one, two = scripts
    assert main(["batch", str(one), str(two), "-o", str(out), "--model", "no-model-here"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out}: holds one script's rendering; several scripts are rendered into folders of their "
                   "own inside -o DIR: choose another -o DIR, or pass --force to write into it")


LONG_ONE = "Good morning.\nguest16: Morning to you.\nHow did you sleep?\nguest16: Not well.\nI am sorry.\n"
LONG_TWO = "guest16: It was late.\nThe rain stopped.\nYes. || No.\nguest16: Bye.\nBye then.\n"


def _hears_ctrl_c() -> None:
    """In the child: Ctrl-C's default, even when the tests run as a background job (a shell starts
    those with SIGINT ignored, and Python then never installs its KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_script_and_the_same_command_finishes_them(
        setup: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C while two scripts render: exit 130, each folder claims only files it has; the same command
    then finishes both, and they come out as each alone."""
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text(LONG_ONE)
    two.write_text(LONG_TWO)
    alone = [_alone(tiny_model_dir, s, tmp_path / f"alone-{s.stem}") for s in (one, two)]
    out = tmp_path / "book"
    argv = [sys.executable, "-m", "companion", "batch", str(one), str(two), "-o", str(out), "--model",
            str(tiny_model_dir), "--voice", "guest", "--seed", "5", "--no-history"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=_hears_ctrl_c)

    def done(folder: Path) -> int:
        try:
            return sum(1 for e in _manifest(folder)["lines"] if e["done"] and not e["clear"])
        except (OSError, ValueError):  # not written yet (written atomically: never half)
            return 0

    try:
        while proc.poll() is None:
            if done(out / "one") >= 1 and done(out / "two") >= 1:  # both under way
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    rendered = done(out / "one") + done(out / "two")
    assert f"interrupted: {rendered} of 10 lines are rendered (each script's manifest.json says which)" in err
    for folder in (out / "one", out / "two"):
        stopped = _manifest(folder)
        assert all((folder / e[k]).is_file() for e in stopped["lines"] if e["done"] and not e["clear"]
                   for k in ("file", "take"))  # the manifest claims no missing file
    assert main(argv[3:]) == 0
    for folder, solo in zip((out / "one", out / "two"), alone, strict=True):
        _same_audio(folder, solo)
        assert _manifest(folder)["lines"] == _manifest(solo)["lines"]
