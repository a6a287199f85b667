"""The speech server at its edges: a body exactly at the size limit and one byte past it (declared or
chunked), every kind of invalid field answering 400, one conversation more than memory holds, and a
client that hangs up between two chunks (the stream function driven directly, so no server layer can
hide a missing check).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serve_helpers import LiveServer, serve_settings

from companion.server.app import _audio_events
from companion.server.encoders import to_pcm16
from companion.server.metrics import Metrics
from companion.server.worker import Job

LIMIT = 1024  # the smallest body limit the settings allow


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module, its home in a temporary directory (the per-test home fixture starts later)."""
    home = tmp_path_factory.mktemp("serve_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPANION_HOME", str(home / "companion_home"))
        mp.setenv("HOME", str(home / "home"))
        live = LiveServer(serve_settings(tiny_model_dir, max_body_bytes=LIMIT, live_conversations=2))
        try:
            yield live
        finally:
            live.stop()


def padded(size: int, **fields: Any) -> bytes:
    """A valid speech request of exactly ``size`` bytes (padded in a field the server ignores)."""
    body = {"model": "csm-1b", "input": "Hi.", "voice": "default", "response_format": "pcm", **fields}
    bare = len(json.dumps({**body, "instructions": ""}).encode())
    raw = json.dumps({**body, "instructions": "x" * (size - bare)}).encode()
    assert len(raw) == size
    return raw


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err


# ---- the body limit


def test_a_body_exactly_at_the_limit_is_served_one_byte_more_is_refused(server: LiveServer) -> None:
    headers = {"content-type": "application/json"}
    ok = server.http.post("/v1/audio/speech", content=padded(LIMIT), headers=headers)
    assert ok.status_code == 200 and len(ok.content) > 0
    err = error(server.http.post("/v1/audio/speech", content=padded(LIMIT + 1), headers=headers), 413)
    assert err["code"] == "body_too_large" and str(LIMIT) in err["message"]


def chunked(raw: bytes, piece: int = 300) -> Iterator[bytes]:
    """The body without Content-Length (httpx sends an iterator with Transfer-Encoding: chunked)."""
    for i in range(0, len(raw), piece):
        yield raw[i : i + piece]


def test_a_chunked_body_at_the_limit_is_served_one_byte_more_is_refused(server: LiveServer) -> None:
    headers = {"content-type": "application/json"}
    ok = server.http.post("/v1/audio/speech", content=chunked(padded(LIMIT)), headers=headers)
    assert ok.status_code == 200 and len(ok.content) > 0, ok.text
    before = server.state.metrics.chunks
    refused = server.http.post("/v1/audio/speech", content=chunked(padded(LIMIT + 1)), headers=headers)
    # A valid request: only the limit can refuse it, as it refuses a Content-Length one.
    err = error(refused, 413)
    assert err["code"] == "body_too_large" and str(LIMIT) in err["message"]
    assert server.state.metrics.chunks == before  # nothing was generated for it


# ---- validation: every kind of bad field is the client's error, one line naming the field


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"speed": "fast"}, "speed"),  # not a number
        ({"input": ["a", "b"]}, "input"),  # not a string
        ({"input": 42}, "input"),
        ({"voice": 7}, "voice"),  # neither a name nor {"id": ...}
        ({"voice": {"name": "x"}}, "voice"),
        ({"conversation": 5}, "conversation"),
        ({"stream_format": None}, "stream_format"),
    ],
)
def test_a_field_of_the_wrong_kind_is_a_400_naming_it(server: LiveServer, fields: dict[str, Any], param: str) -> None:
    body = {"model": "csm-1b", "input": "Hi.", "voice": "default", **fields}
    err = error(server.http.post("/v1/audio/speech", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert err["param"] == param and err["message"].startswith(f"'{param}")


# ---- conversations kept in memory: least recently used goes first


def speak(server: LiveServer, conversation: str) -> None:
    body = {"model": "csm-1b", "input": "Hi.", "voice": "default", "response_format": "pcm",
            "conversation": conversation}
    response = server.http.post("/v1/audio/speech", json=body)
    assert response.status_code == 200, response.text


def test_one_conversation_more_than_memory_holds_drops_the_least_recently_used(server: LiveServer) -> None:
    """Memory holds 2. a and b are opened, a is used again (read back), c is opened: b goes, not a."""
    live = server.state.conversations._live  # (key's namespace, id) held in memory, most recently used last
    speak(server, "lru-a")
    speak(server, "lru-b")
    kept = live[("", "lru-a")]
    assert server.http.get("/v1/conversations/lru-a").status_code == 200
    speak(server, "lru-c")
    assert [name for _, name in live] == ["lru-a", "lru-c"]
    assert live[("", "lru-a")] is kept  # the same session, not one resumed from the history
    speak(server, "lru-a")  # used again: c is now the least recent
    speak(server, "lru-d")
    assert [name for _, name in live] == ["lru-a", "lru-d"]
    # a dropped conversation is resumed from the history, with everything it said
    turns = server.http.get("/v1/conversations/lru-b").json()["turns"]
    assert [t["text"] for t in turns] == ["Hi."]


# ---- a hang-up between two chunks, on the stream function itself


class Client:
    """What the stream function asks of the request: whether the client is still there."""

    def __init__(self, gone_after: int | None) -> None:
        self.gone_after = gone_after  # checks answered "connected" before the client leaves (None: never)
        self.checks = 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return self.gone_after is not None and self.checks > self.gone_after


class State:
    def __init__(self) -> None:
        self.metrics = Metrics()


def stream(client: Client, chunks: int) -> tuple[list[bytes], Job, State]:
    """Run the response body of a job whose worker has produced ``chunks`` audio chunks and its end."""
    state = State()

    async def run() -> tuple[list[bytes], Job]:
        job = Job(asyncio.get_running_loop())
        audio = [np.full(1920, 0.1 * (i + 1), np.float32) for i in range(chunks)]
        for chunk in audio[1:]:
            job.events.put_nowait(("audio", chunk))
        job.events.put_nowait(("end", None))
        body = _audio_events(state, job, client, ("audio", audio[0]), "pcm", False, 0.0, 3)  # type: ignore[arg-type]
        return [data async for data in body], job

    out, job = asyncio.run(run())
    return out, job, state


def test_a_client_gone_between_chunks_stops_the_stream_and_the_generation() -> None:
    out, job, state = stream(Client(gone_after=1), chunks=5)
    assert len(out) == 2  # chunk 1, chunk 2 (the client was there), then the check found it gone
    assert job.cancel.is_set() and not job.finished and state.metrics.disconnects == 1


def test_a_client_that_stays_gets_every_chunk_and_nothing_is_cancelled() -> None:
    client = Client(gone_after=None)
    out, job, state = stream(client, chunks=5)
    assert out == [to_pcm16(np.full(1920, 0.1 * (i + 1), np.float32)) for i in range(5)]
    assert client.checks == 4  # once before each chunk after the first
    assert job.finished and not job.cancel.is_set() and state.metrics.disconnects == 0
