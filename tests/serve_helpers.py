"""The real speech server (uvicorn, ephemeral loopback port, tiny checkpoint) for the serve tests."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from companion.config import Settings, load_settings

STARTUP_LIMIT_S = 120  # a generous bound on waiting for startup (never a pass/fail threshold)


def serve_settings(model_dir: Path, max_batch: int = 1, **serve: Any) -> Settings:
    return load_settings(overrides={
        "model": {"id": str(model_dir), "device": "cpu", "dtype": "float32"},
        "generation": {"max_segment_seconds": 2.0, "seed": 7},
        "context": {"max_seq_len": 1024},
        "engine": {"max_batch": max_batch},
        "serve": serve,
    })


class LiveServer:
    """``create_app`` run by uvicorn in a thread on 127.0.0.1:0, until ``stop()``."""

    def __init__(self, settings: Settings, api_key: str | None = None, keys: Any = None) -> None:
        import uvicorn

        from companion.commands.serve import uvicorn_config
        from companion.server import create_app

        self.app = create_app(settings, api_key=api_key, keys=keys)
        self.state = self.app.state.companion
        config = uvicorn_config(self.app, settings, "127.0.0.1", 0, "warning", self.state.refusals)  # as `serve` runs it
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to listen")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        wait_for(lambda: self.state.ready.is_set(), "the model to load")

    def openai(self, api_key: str = "unused") -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """One sample of GET /metrics (e.g. ``companion_generations_cancelled_total``)."""
        text = self.http.get("/metrics", headers=headers).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(60)


def wait_for(condition: Any, what: str) -> None:
    """Poll ``condition`` (a count or a state, never a duration) until it holds."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


# Three sentences: three segments of up to 2 s (the tiny model never ends one early), about 15 chunks.
LONG_INPUT = "The morning was quiet. Birds sang in the old oak tree. A cat watched them from the wall."


def read_all(raw: socket.socket, into: list[bytes]) -> None:
    """Read a raw connection until it closes (a client that listens), appending what arrives to ``into``."""
    try:
        while data := raw.recv(65536):
            into.append(data)
    except OSError:
        pass
