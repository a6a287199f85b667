"""A long `say` (issue 19, acceptance 2): progress lines on a stderr that is not a terminal, and Ctrl-C
in `say -o` leaves a WAV holding the parts finished, which is exactly the start of the whole rendering.

The real binary on the tiny checkpoint; generation is cut into 1-second parts (max_segment_seconds: 1)
so a few sentences make several parts, and a seed makes two runs produce the same audio.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from companion.commands.progress import LONG_WORK_SECONDS, SayProgress

ROOT = Path(__file__).resolve().parents[1]
COMPANION = [sys.executable, "-m", "companion"]
TEXT = "Hello there. How are you today? The weather is fine. Let us go for a walk."
PART = re.compile(r"^part (\d+) of (\d+) done \((\d+\.\d) s of audio")


def _env(home: Path) -> dict[str, str]:
    return dict(os.environ, COMPANION_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _config(home: Path) -> None:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 1\n  seed: 7\n")


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_parts_and_progress_shows_on_a_pipe(tmp_path: Path, companion_home: Path,
                                                                      tiny_model_dir: Path) -> None:
    _config(companion_home)
    argv = [*COMPANION, "say", TEXT, "-o", "cut.wav", "--model", str(tiny_model_dir), "--no-watermark"]
    child = subprocess.Popen(argv, cwd=tmp_path, env=_env(companion_home), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    seen: list[str] = []
    try:
        for line in child.stderr:  # stderr is a pipe: the progress comes as lines
            seen.append(line.rstrip("\n"))
            found = PART.match(seen[-1])
            if found and int(found.group(1)) == 2:
                child.send_signal(signal.SIGINT)  # Ctrl-C, in the middle of the third part
                break
        rest_err, out = child.communicate(timeout=300)[::-1]
    finally:
        if child.poll() is None:
            child.kill()
    seen += rest_err.splitlines()
    print(out, *seen, sep="\n")
    parts = [PART.match(ln) for ln in seen if PART.match(ln)]
    assert [int(p.group(1)) for p in parts][:2] == [1, 2]  # type: ignore[union-attr]
    total = int(parts[0].group(2))  # type: ignore[union-attr]
    assert total >= 4
    assert child.returncode == 130
    said = [ln for ln in out.splitlines() if ln.startswith("warning: interrupted: wrote the ")]
    assert len(said) == 1, out
    kept_parts, kept_seconds = re.match(r"warning: interrupted: wrote the (\d+) of \d+ parts finished \((\d+\.\d) s\) to cut\.wav",
                                        said[0]).groups()  # type: ignore[union-attr]
    assert 2 <= int(kept_parts) < total
    audio, rate = sf.read(str(tmp_path / "cut.wav"), dtype="float32")
    assert rate == 24000 and f"{len(audio) / rate:.1f}" == kept_seconds
    # the audio kept is what the progress said was finished at that part: whole parts, nothing half made
    # (the line of the last part kept may not be out yet if Ctrl-C came between the two)
    made = {int(p.group(1)): p.group(3) for p in parts}  # type: ignore[union-attr]
    assert made.get(int(kept_parts), kept_seconds) == kept_seconds

    # the same text, not interrupted, from a fresh home (the first run kept the voice it made): the kept
    # file is exactly the beginning of the whole
    fresh = tmp_path / "fresh_home"
    _config(fresh)
    full = subprocess.run([*argv[:6], "full.wav", *argv[7:]], cwd=tmp_path, env=_env(fresh),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    whole, _ = sf.read(str(tmp_path / "full.wav"), dtype="float32")
    assert len(whole) > len(audio)
    np.testing.assert_array_equal(whole[: len(audio)], audio)


def test_progress_lines_and_the_long_work_warning(companion_home: Path) -> None:
    """SayProgress on a plain stream (not a terminal), over a real Session's record of finished parts."""
    import io
    from collections import deque
    from types import SimpleNamespace

    stream = io.StringIO()
    session = SimpleNamespace(stats=deque(maxlen=2))  # the record Session keeps: bounded, so only identity counts
    progress = SayProgress(3, 3 * LONG_WORK_SECONDS, stream=stream)

    def chunks():  # three parts of two chunks; a part's record appears when its last chunk has been taken
        for part in range(3):
            for _ in range(2):
                yield np.full(12000, part, np.float32)
            session.stats.append(object())

    got = list(progress.follow(session, chunks()))  # type: ignore[arg-type]
    assert len(got) == 6 and progress.done == 3 and len(progress.finished_audio()) == 72000
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("warning: this text is about 30 min of speech")
    assert lines[1].startswith("part 1 of 3 done (1.0 s of audio, about ")
    assert lines[2].startswith("part 2 of 3 done (2.0 s of audio, about ")
    assert lines[3] == "part 3 of 3 done (3.0 s of audio)"
    assert len(lines) == 4  # one warning, not one per part

    short = io.StringIO()
    one = SayProgress(1, 2.0, stream=short)
    session.stats.clear()
    list(one.follow(session, iter([np.zeros(10, np.float32)])))  # type: ignore[arg-type]
    assert short.getvalue() == ""  # a few sentences: no progress shown



def test_on_a_terminal_the_progress_is_a_bar(companion_home: Path) -> None:
    """stderr a terminal (a real pty): rich's bar is drawn there, and no plain lines."""
    import pty
    from collections import deque
    from types import SimpleNamespace

    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    session = SimpleNamespace(stats=deque(maxlen=2))

    def chunks():
        for part in range(3):
            yield np.full(2400, part, np.float32)
            session.stats.append(object())

    try:
        progress = SayProgress(3, 5.0, stream=stream)
        assert len(list(progress.follow(session, chunks()))) == 3  # type: ignore[arg-type]
        stream.flush()
        drawn = b""
        while True:
            import select

            if not select.select([master], [], [], 0.5)[0]:
                break
            drawn += os.read(master, 65536)
    finally:
        stream.close()
        os.close(master)
    text = drawn.decode(errors="replace")
    assert "speaking" in text and "part 1 of 3" not in text
