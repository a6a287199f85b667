"""`companion chat` with llm.enabled: the reply comes from a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from terminal import COMPANION, Tmux, tmux_missing
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
    # a wide terminal: /stats rows stay on one line however long the temporary path in them (an xdist
    # worker's is longer)
    env = dict(os.environ, PULSE_SERVER="unix:/nonexistent/native", COLUMNS="200", **{KEY_ENV: KEY})
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
    # llm.enabled is false: mode speak, until /mode chat
    speak = _chat(tmp_path, tiny_model_dir, "Just say this.\n/mode\n/mode chat\nFifth.\n", "--resume")
    assert "mode speak: what you type is spoken" in speak.stdout and "mode chat: echo at" in speak.stdout
    assert "companion: You said: Fifth." in speak.stdout and "companion: You said: Just" not in speak.stdout
    assert len(llm_server.requests) == 5
    assert sent() == ["sys", "Third.", "You said: Third.", "Fourth.", "You said: Fourth.", "Fifth."]
    with sqlite3.connect(companion_home / "data" / "history.sqlite3") as db:
        rows = db.execute("SELECT user_text, reply, partial FROM exchanges ORDER BY seq").fetchall()
    assert rows == [(f"{u}.", f"You said: {u}.", 0) for u in ("Hello there", "Again", "Third", "Fourth", "Fifth")]


@pytest.mark.tty
@pytest.mark.skipif(tmux_missing() is not None, reason=str(tmux_missing()))
def test_chat_mode_on_a_terminal(tmp_path: Path, companion_home: Path, tiny_model_dir, llm_server):
    """The reply's text shows as it streams; a new line interrupts it (llm.new_line: interrupt), and so
    does Ctrl-C; each reply is recorded as far as it was spoken, marked partial."""
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text(
        "generation:\n  max_segment_seconds: 1\n"
        f"llm:\n  enabled: true\n  base_url: {llm_server.base_url}\n  model: endless\n  api_key_env: {KEY_ENV}\n"
        "  new_line: interrupt\n"
    )
    env = dict(os.environ, PULSE_SERVER="unix:/nonexistent/native", TERM="xterm-256color", **{KEY_ENV: KEY})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    first = "The first sentence is here."

    def exchanges() -> list[tuple[str, str, int]]:
        with sqlite3.connect(companion_home / "data" / "history.sqlite3") as db:
            try:
                return db.execute("SELECT user_text, reply, partial FROM exchanges ORDER BY seq").fetchall()
            except sqlite3.OperationalError:  # not created yet
                return []

    def saved(n: int) -> None:
        for _ in range(30000):  # a count, not a clock
            if len(exchanges()) == n:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"exchange {n} was never saved")

    term = Tmux([*COMPANION, "chat", "--model", str(tiny_model_dir)], env, cwd=tmp_path)
    try:
        term.wait_for(r"you›", timeout=300)
        term.wait_for(r" chat │ voice default", timeout=10)  # the toolbar shows the mode
        term.type_line("Tell me.")
        term.wait_for(r"companion: The first sentence is here\.", timeout=120)
        saved(1)  # spoken; the server holds the rest of the reply
        term.type_line("Hello.")  # interrupts the reply, and is answered
        term.wait_for("⏹ cancelled", timeout=60)
        saved(2)
        term.keys("C-c")
        term.wait_for("⏹ cancelled", timeout=60, count=2)
        text = term.transcript()
        term.keys("C-d")
        assert term.exit_code(timeout=120) == 0
    finally:
        term.close()
    print(text)
    assert len(re.findall(r"companion: The first sentence is here\.", text)) == 2
    assert exchanges() == [("Tell me.", first, 1), ("Hello.", first, 1)]
    assert len(llm_server.requests) == 2 and KEY not in text
