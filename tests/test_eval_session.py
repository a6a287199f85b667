"""`companion eval session` on a conversation the chat saved (tiny checkpoint, real history database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from companion.audio.io import write_wav
from companion.config import load_settings
from companion.engine import Engine
from companion.paths import get_paths
from companion.session import Session
from companion.store import Store, TurnRecord
from companion.voices import VoiceProfile, VoiceStore

LINES = ("Hello there, how are you today?", "Fine, thank you.", "What shall we talk about?")


def companion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=900)


def _record_conversation(tiny_model_dir: Path, data_dir: Path) -> tuple[int, list[np.ndarray]]:
    """Three spoken lines of ~3 s each, then a fourth turn of 0.4 s (too short to measure)."""
    paths = get_paths()
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text("watermark:\n  enabled: false\n")
    VoiceStore().add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")], transcript_file=str(data_dir / "guest.txt")))
    settings = load_settings(overrides={"generation": {"max_segment_seconds": 3.0}, "context": {"max_seq_len": 1024}})
    engine = Engine.load(str(tiny_model_dir), max_seq_len=1024)
    with Store() as store:
        session = Session(engine, settings, store, VoiceStore())
        session.use_voice("guest")
        for line in LINES:
            list(session.speak(line))
        sid = session.session_id
        assert sid is not None
        first = store.turns(sid)[0]
        store.add_turn(sid, TurnRecord("guest", first.speaker, "Hm.", first.codes[:, :5]), context_start=None)
        return sid, [engine.decode(t.codes) for t in store.turns(sid)]


@pytest.mark.slow
def test_eval_session_table_mean_slope_plot_and_json(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    sid, decoded = _record_conversation(tiny_model_dir, data_dir)
    assert [len(a) / 24000 for a in decoded][3] == pytest.approx(0.4)

    png = tmp_path / "drift.png"
    shown = companion("eval", "session", str(sid), "--model", str(tiny_model_dir), "--plot", str(png))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.splitlines()
    assert out[0] == f"conversation {sid}: 4 turns"
    assert out[1] == f"voice guest: reference {data_dir / 'guest.mp3'}"
    assert out[2].split() == ["TURN", "VOICE", "LENGTH", "SIMILARITY", "VERDICT", "TEXT"]
    rows = out[3:7]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    for row, line in zip(rows[:3], LINES, strict=True):
        assert row.split()[1:3] == ["guest", "3.0s"] and row.endswith(line)
        float(row.split()[3])  # a measured similarity
    assert "not measured" in rows[3] and "too short to measure (0.4 s of speech, at least 1 s needed)" in rows[3]
    assert out[7].startswith("guest: mean ") and " over 3 turns, drift " in out[7] and out[7].endswith(" per turn")
    assert out[8] == f"wrote {png}"

    # The plot is a real PNG that matplotlib reads back, of the size it was drawn at.
    import matplotlib.image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(png)).shape[:2] == (396, 770)

    as_json = companion("eval", "session", str(sid), "--model", str(tiny_model_dir), "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["session"] == sid and report["plot"] is None
    turns = report["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert turns[3]["similarity"] is None and turns[3]["verdict"] == "not measured"
    assert turns[3]["problem"].startswith("too short to measure")
    sims = [t["similarity"] for t in turns[:3]]
    (voice,) = report["voices"]
    assert voice["voice"] == "guest" and voice["turns_measured"] == 3
    assert voice["mean"] == pytest.approx(np.mean(sims), abs=1e-4)
    assert voice["slope_per_turn"] == pytest.approx(np.polyfit([1, 2, 3], sims, 1)[0], abs=1e-4)
    # The text table shows the same numbers.
    assert [float(r.split()[3]) for r in rows[:3]] == pytest.approx(sims, abs=6e-4)

    # Each turn scores the same when its audio is a file measured with `eval voice` (float WAV: same samples).
    files = []
    for i, audio in enumerate(decoded[:3], start=1):
        files.append(tmp_path / f"turn{i}.wav")
        write_wav(files[-1], audio, 24000, subtype="FLOAT")
    by_file = companion("eval", "voice", str(data_dir / "guest.mp3"), *map(str, files), "--json")
    assert by_file.returncode == 0, by_file.stderr
    assert [r["similarity"] for r in json.loads(by_file.stdout)["results"]] == pytest.approx(sims, abs=1e-3)

    # Without the voice profile, the reference the conversation stored is decoded and used instead.
    VoiceStore().remove("guest")
    stored = companion("eval", "session", str(sid), "--model", str(tiny_model_dir), "--json")
    assert stored.returncode == 0, stored.stderr
    (voice,) = json.loads(stored.stdout)["voices"]
    assert voice["reference"] == "the reference stored with the conversation" and voice["turns_measured"] == 3


def test_eval_session_errors(tiny_model_dir: Path, data_dir: Path) -> None:
    bad_reference = companion("eval", "session", "1", "--reference", str(data_dir / "not_audio.wav"))
    assert bad_reference.returncode == 1
    assert bad_reference.stderr.splitlines() == [
        f"error: {data_dir / 'not_audio.wav'}: not a readable audio file (Format not recognised): use a WAV, MP3, "
        "FLAC or OGG file, or re-export it"]
    none_yet = companion("eval", "session", "1", "--model", str(tiny_model_dir))
    assert none_yet.returncode == 1
    assert none_yet.stderr.splitlines() == ["error: no conversations yet: start one with `companion chat`"]
    Store().close()  # an empty history
    unknown = companion("eval", "session", "7", "--model", str(tiny_model_dir))
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines() == ["error: no conversation 7 in the history: `companion history list` shows the ids"]
