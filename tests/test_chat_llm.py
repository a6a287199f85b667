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
