"""`companion chat` with llm.enabled: the reply comes from a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from terminal import COMPANION
from test_llm import KEY, KEY_ENV, serving

pytestmark = pytest.mark.slow


@pytest.fixture
def llm_server():
    yield from serving()


def test_the_llm_writes_what_is_spoken(tmp_path: Path, companion_home: Path, tiny_model_dir, llm_server):
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text(
        "generation:\n  max_segment_seconds: 1\n"
        f"llm:\n  enabled: true\n  base_url: {llm_server.base_url}\n  model: echo\n  api_key_env: {KEY_ENV}\n"
    )
    env = dict(os.environ, PULSE_SERVER="unix:/nonexistent/native", **{KEY_ENV: KEY})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([*COMPANION, "chat", "--model", str(tiny_model_dir), "--save-dir", str(tmp_path)],
                         input="Hello there.\n$CLEAR$\nAgain.\n", capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    print(out.stdout, out.stderr, sep="\n")
    assert out.returncode == 0
    assert "companion: You said: Hello there." in out.stdout and "companion: You said: Again." in out.stdout
    assert KEY not in out.stdout + out.stderr
    # $CLEAR$ made the LLM forget too: the second request carries only the system prompt and "Again."
    second = llm_server.requests[-1]["body"]["messages"]
    assert [m["content"] for m in second if m["role"] != "system"] == ["Again."]
    with sqlite3.connect(companion_home / "data" / "history.sqlite3") as db:
        texts = [row[0] for row in db.execute("SELECT text FROM turns ORDER BY seq")]
    assert any(t.startswith("You said") for t in texts) and not any(t == "Hello there." for t in texts)
    assert KEY not in (companion_home / "data" / "history.sqlite3").read_bytes().decode("latin-1")


def _chat(tmp_path: Path, model_dir: Path, lines: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PULSE_SERVER="unix:/nonexistent/native", **{KEY_ENV: KEY})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([*COMPANION, "chat", "--model", str(model_dir), "--save-dir", str(tmp_path), *extra],
                         input=lines, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    print(out.stdout, out.stderr, sep="\n")
    assert out.returncode == 0
    return out


def test_resume_restores_what_the_llm_remembers(tmp_path: Path, companion_home: Path, tiny_model_dir, llm_server):
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text(
        "generation:\n  max_segment_seconds: 1\n"
        f"llm:\n  base_url: {llm_server.base_url}\n  model: echo\n  api_key_env: {KEY_ENV}\n  system_prompt: sys\n"
    )
    first = _chat(tmp_path, tiny_model_dir, "Hello there.\n/stats\n", "--mode", "chat")
    assert "companion: You said: Hello there." in first.stdout
    assert "first sentence -> first audio (last reply)" in first.stdout
    assert "engine first audio (last reply)" in first.stdout

    def sent(i: int = -1) -> list[str]:
        return [m["content"] for m in llm_server.requests[i]["body"]["messages"]]

    second = _chat(tmp_path, tiny_model_dir, "Again.\n$CLEAR$\nThird.\n", "--resume", "--mode", "chat")
    assert "resumed conversation 1" in second.stdout
    assert sent(-2) == ["sys", "Hello there.", "You said: Hello there.", "Again."]  # remembered across sessions
    assert sent(-1) == ["sys", "Third."]  # $CLEAR$ emptied the LLM's memory too
    _chat(tmp_path, tiny_model_dir, "Fourth.\n", "--resume", "--mode", "chat")
    assert sent() == ["sys", "Third.", "You said: Third.", "Fourth."]  # the clear was saved with the session
    speak = _chat(tmp_path, tiny_model_dir, "Just say this.\n", "--resume")  # llm.enabled is false: mode speak
    assert len(llm_server.requests) == 4 and "companion:" not in speak.stdout
    with sqlite3.connect(companion_home / "data" / "history.sqlite3") as db:
        rows = db.execute("SELECT user_text, reply, partial FROM exchanges ORDER BY seq").fetchall()
    assert rows == [(f"{u}.", f"You said: {u}.", 0) for u in ("Hello there", "Again", "Third", "Fourth")]
