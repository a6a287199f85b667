"""``kill -9`` in the middle of a turn, then resume: the history is intact and the unfinished turn absent."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch

from companion.config import load_settings
from companion.engine import Engine
from companion.paths import get_paths
from companion.session import resume_session
from companion.store import Store
from companion.voices import VoiceProfile, VoiceStore

# The child speaks N-1 short turns, prints each one's codes digest, then starts a long turn N and
# announces it after its first audio chunk while it keeps generating (about 300 more frames).
CHILD = r"""
import hashlib, sys
from companion.config import load_settings
from companion.engine import Engine
from companion.session import Session, resume_session
from companion.store import Store
from companion.voices import VoiceStore

def digest(codes):
    return hashlib.sha256(codes.to(dtype=__import__("torch").int64).numpy().tobytes()).hexdigest()

model, n = sys.argv[1], int(sys.argv[2])
settings = load_settings(overrides={"generation": {"max_segment_seconds": 1.2}, "context": {"max_seq_len": 1024},
                                    "watermark": {"enabled": False}})
session = Session(Engine.load(model, max_seq_len=1024), settings, Store(), VoiceStore())
session.use_voice("guest")
print("REF", digest(session.voice.codes), flush=True)
for i in range(1, n):
    list(session.speak(["Yes.", "Right.", "Sure.", "Good."][i % 4]))
    turn = session.context.turns[-1]
    print("DONE", turn.seq, digest(turn.codes), flush=True)
print("SESSION", session.session_id, flush=True)
session.settings.generation.max_segment_seconds = 25.0
for i, chunk in enumerate(session.speak("This last turn is long and it never gets to finish, because it is killed.")):
    if i == 0:
        print("GENERATING", n, flush=True)
print("FINISHED", flush=True)  # never reached: the parent kills the process first
"""


def digest(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.to(dtype=torch.int64).numpy().tobytes()).hexdigest()


def test_kill_9_during_a_turn_then_resume(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    VoiceStore().add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")],
                                  transcript_file=str(data_dir / "guest.txt")))
    n = 6
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_model_dir), str(n)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
    lines: list[str] = []
    assert child.stdout is not None
    for line in child.stdout:
        lines.append(line.strip())
        if line.startswith("GENERATING"):
            os.kill(child.pid, signal.SIGKILL)  # in the middle of turn n
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, lines
    assert "FINISHED" not in lines
    ref = next(line.split()[1] for line in lines if line.startswith("REF"))
    done = {int(line.split()[1]): line.split()[2] for line in lines if line.startswith("DONE")}
    sid = int(next(line.split()[1] for line in lines if line.startswith("SESSION")))
    assert sorted(done) == list(range(1, n))

    # The database file is sound, before anything of ours opens it.
    raw = sqlite3.connect(get_paths().history_db)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()

    with Store() as store:
        turns = store.turns(sid)
        assert [t.seq for t in turns] == list(range(1, n))  # turn n is absent, not half-saved
        assert {t.seq: digest(t.codes) for t in turns} == done
        settings = load_settings(overrides={"generation": {"max_segment_seconds": 1.2}, "context": {"max_seq_len": 1024}})
        engine = Engine.load(str(tiny_model_dir), max_seq_len=1024)
        resumed = resume_session(engine, settings, store, None, VoiceStore())  # the latest session
        assert resumed.session_id == sid and resumed.active == "guest"
        context = resumed.context_segments()
        assert digest(context[0].codes) == ref  # the same pinned reference
        assert [digest(s.codes) for s in context[1:]] == [done[i] for i in range(1, n)]  # the same turns
        list(resumed.speak("Yes."))  # the conversation goes on where it was
        assert [t.seq for t in store.turns(sid)] == list(range(1, n + 1))
        assert store.integrity_check() == "ok"
