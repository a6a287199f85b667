"""`companion history list|show|export` through the real entry point, on a real history database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from companion.config import load_settings
from companion.engine import Engine
from companion.paths import get_paths
from companion.session import Session
from companion.store import Store
from companion.voices import VoiceProfile, VoiceStore


def companion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)


def _record_conversation(tiny_model_dir: Path, data_dir: Path) -> tuple[int, list]:
    """A real session: one voice, three lines, a $CLEAR$, one more line."""
    paths = get_paths()
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text("watermark:\n  enabled: false\n")
    VoiceStore().add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")], transcript_file=str(data_dir / "guest.txt")))
    settings = load_settings(overrides={"generation": {"max_segment_seconds": 1.2}, "context": {"max_seq_len": 1024}})
    engine = Engine.load(str(tiny_model_dir), max_seq_len=1024)
    with Store() as store:
        session = Session(engine, settings, store, VoiceStore())
        session.use_voice("guest")
        for line in ("Yes.", "Right.", "$CLEAR$", "Sure, 2."):
            list(session.speak(line))
        assert session.session_id is not None
        return session.session_id, [engine.decode(t.codes) for t in store.turns(session.session_id)]


def test_list_show_export(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    sid, decoded = _record_conversation(tiny_model_dir, data_dir)

    listed = companion("history", "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split()[:2] == ["ID", "UPDATED"]
    assert rows[1].split()[0] == str(sid) and "guest" in rows[1] and "Yes." in rows[1]

    shown = companion("history", "show", str(sid))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"conversation {sid}" in out and "voice guest (speaker 0): reference 19.8 s" in out
    turn_lines = [ln for ln in out.splitlines() if ln[:4].strip().isdigit()]
    assert [ln.split()[0] for ln in turn_lines] == ["1", "2", "3"]
    assert "[not in memory]" in turn_lines[0] and "[not in memory]" in turn_lines[1]  # forgotten by $CLEAR$
    assert turn_lines[2].endswith("Sure, two.") and "[" not in turn_lines[2]
    typed = [ln.split("typed:")[1].strip() for ln in out.splitlines() if ln.strip().startswith("typed:")]
    assert typed == ["Sure, 2."]  # what the user typed is kept beside what was spoken

    wav = tmp_path / "conv.wav"
    exported = companion("history", "export", str(sid), str(wav))  # the model it was recorded with
    assert exported.returncode == 0, exported.stderr
    audio, rate = sf.read(str(wav), dtype="float32")
    assert rate == 24000
    gap = np.zeros(int(0.25 * rate), dtype=np.float32)
    expected = np.concatenate([decoded[0], gap, decoded[1], gap, decoded[2]])
    assert audio.shape == expected.shape
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1.0 / 32767 + 1e-6)  # PCM16


def test_empty_history_and_unknown_id() -> None:
    empty = companion("history", "list")
    assert empty.returncode == 0 and "no conversations yet" in empty.stdout
    Store().close()  # an empty database
    missing = companion("history", "show", "99")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no conversation 99 in the history: `companion history list` shows the ids"
