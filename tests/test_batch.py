"""`companion batch` through the real entry point, on the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from companion.paths import get_paths
from companion.store import Store
from companion.voices import VoiceProfile, VoiceStore

SCRIPT = """# a small play
Good morning.

guest16: Morning to you.
Yes. || No. || Sure.
$CLEAR$
guest16: Bye.
"""


def companion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)


@pytest.fixture
def setup(data_dir: Path) -> None:
    """Two voices and a config with short segments and a small context (so it runs in seconds)."""
    paths = get_paths()
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text("generation:\n  max_segment_seconds: 1.2\ncontext:\n  max_seq_len: 1536\n"
                                 "watermark:\n  enabled: false\n")
    voices = VoiceStore()
    for name, audio in (("guest", "guest.mp3"), ("guest16", "guest_16k.wav")):
        voices.add(VoiceProfile(name=name, audio=[str(data_dir / audio)], transcript_file=str(data_dir / "guest.txt")))


def test_batch_renders_numbered_files_and_the_conversation(setup: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "play.txt"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    result = companion("batch", str(script), "-o", str(out), "--model", str(tiny_model_dir), "--voice", "guest", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "rendering" in result.stderr  # the progress bar
    names = sorted(p.name for p in out.glob("*.wav"))
    assert names == ["001-guest.wav", "002-guest16.wav", "003-guest+guest16.wav", "004-guest16.wav", "conversation.wav"]
    lengths = {}
    for name in names:
        info = sf.info(str(out / name))
        assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0
        lengths[name] = info.frames
    lines_total = sum(n for name, n in lengths.items() if name != "conversation.wav")
    assert lengths["conversation.wav"] > lines_total  # every line, plus the gaps between utterances
    assert "history conversation 1" in result.stdout
    with Store() as store:
        turns = store.turns(1)
        assert [t.voice for t in turns][-4:] == ["guest", "guest16", "guest", "guest16"]
        assert turns[-1].text == "Bye." and store.session(1).context_start == turns[-1].seq  # $CLEAR$ recorded


def test_batch_without_history(setup: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "one.txt"
    script.write_text("Hi.\n")
    result = companion("batch", str(script), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                       "--voice", "guest", "--no-history")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "001-guest.wav").exists()
    assert not get_paths().history_db.exists()


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "script not found: check the path"),
        ("# only a comment\n\n", [], "no lines to speak"),
        ("Hi.\n", ["--voice", "nobody"], "unknown voice 'nobody'"),
    ],
)
def test_batch_errors_are_one_line(setup: None, tiny_model_dir: Path, tmp_path: Path, content: str | None,
                                   extra: list[str], message: str) -> None:
    script = tmp_path / "s.txt"
    if content is not None:
        script.write_text(content)
    result = companion("batch", str(script), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir), *extra)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
