"""`companion serve` as a user runs it: the real command in a subprocess (security, SIGTERM)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import httpx
from serve_helpers import LONG_INPUT, decode, pcm_samples, wait_for
from terminal import COMPANION

KEY = "k3y-never-logged"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COMPANION_API_KEY"}
    env.update(COMPANION_HOME=str(home), OMP_NUM_THREADS="1", **extra)
    return env


def _config(home: Path) -> None:
    (home / "config").mkdir(exist_ok=True)
    (home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 2\n  seed: 3\n"
                                                 "context:\n  max_seq_len: 1024\n")


def test_other_host_without_key_refuses_to_start(companion_home: Path, tiny_model_dir: Path) -> None:
    out = subprocess.run([*COMPANION, "serve", "--host", "0.0.0.0", "--model", str(tiny_model_dir)],
                         env=_env(companion_home), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "COMPANION_API_KEY" in lines[0] and "0.0.0.0" in lines[0] and lines[0].startswith("error: ")


def test_a_model_that_cannot_load_stops_the_server_with_one_line(companion_home: Path, tmp_path: Path) -> None:
    out = subprocess.run([*COMPANION, "serve", "--port", "0", "--model", str(tmp_path / "missing"), "--log-level", "error"],
                         env=_env(companion_home), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "missing" in last and "Traceback" not in out.stderr


class _Output:
    """The server's stderr, read in a thread (so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.text += line

    def join(self) -> None:
        self._thread.join(30)


def test_key_required_off_loopback_and_sigterm_finishes_the_reply(companion_home: Path, tiny_model_dir: Path) -> None:
    _config(companion_home)
    proc = subprocess.Popen([*COMPANION, "serve", "--host", "0.0.0.0", "--port", "0", "--model", str(tiny_model_dir)],
                            env=_env(companion_home, COMPANION_API_KEY=KEY), stderr=subprocess.PIPE, text=True)
    output = _Output(proc)
    try:
        wait_for(lambda: re.search(r"running on http://0\.0\.0\.0:(\d+)", output.text) or proc.poll() is not None,
                 "the server to listen")
        port = re.search(r"running on http://0\.0\.0\.0:(\d+)", output.text)
        assert port, output.text
        url = f"http://127.0.0.1:{port.group(1)}"
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, "the model to load")
        body = {"model": "csm-1b", "input": "Hi.", "voice": "default", "response_format": "wav"}
        denied = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(f"{url}/v1/audio/speech", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        ok = httpx.post(f"{url}/v1/audio/speech", json=body, headers=auth, timeout=120)
        assert ok.status_code == 200 and decode(ok.content)[1] == 24000
        # SIGTERM while a reply streams: the reply is finished, then the server exits cleanly.
        long = {**body, "input": LONG_INPUT, "response_format": "pcm"}
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=long, headers=auth, timeout=120) as response:
            pieces = response.iter_bytes()
            first = next(pieces)
            proc.send_signal(signal.SIGTERM)
            data = first + b"".join(pieces)
        samples = pcm_samples(data)
        assert len(samples) > len(pcm_samples(first)) and len(samples) % 1920 == 0
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output.join()
    assert "companion serve: stopped" in output.text
    assert KEY not in output.text
