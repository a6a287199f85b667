"""The server's plain ASGI layers driven directly: the request body's limits and the request counters.

Each test hands the middleware a scope and a list of the messages a client sends, and a small app that
writes down what it was given; what goes back to the client is every message the middleware or the app
sent. No server sits in between, so no layer can hide a missing check (a real server in front is tested
in tests/test_serve_boundaries.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from companion.server.metrics import Metrics
from companion.server.middleware import RequestBody, RequestMetrics

LIMIT = 10


class App:
    """Reads the whole body as a real app does, then answers ``status``; keeps what it read."""

    def __init__(self, status: int = 200, reads_after: int = 0, raises: bool = False) -> None:
        self.status, self.reads_after, self.raises = status, reads_after, raises
        self.calls = 0
        self.body = b""
        self.messages: list[dict[str, Any]] = []  # the body's messages, as the app received them
        self.later: list[dict[str, Any]] = []  # messages received after the body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls += 1
        while True:
            message = await receive()
            self.messages.append(message)
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        for _ in range(self.reads_after):
            self.later.append(await receive())
        if self.raises:
            raise RuntimeError("the app's own bug")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class Client:
    """The messages a client sends, one per ``receive()``; a hang-up once they are used up (or a wait
    that never ends, when ``stalls``)."""

    def __init__(self, messages: list[dict[str, Any]], stalls: bool = False) -> None:
        self.messages, self.stalls = list(messages), stalls
        self.received = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        if self.messages:
            return self.messages.pop(0)
        if self.stalls:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) <= 1
        return starts[0]["status"] if starts else None

    def error(self) -> dict[str, Any]:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return json.loads(body)["error"]


def scope(headers: dict[bytes, bytes] | None = None, kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "method": "POST", "path": "/v1/audio/speech", "headers": list((headers or {}).items())}


def chunks(*parts: bytes) -> list[dict[str, Any]]:
    return [{"type": "http.request", "body": p, "more_body": i + 1 < len(parts)} for i, p in enumerate(parts)]


def run(middleware: Any, client: Client, s: dict[str, Any] | None = None) -> None:
    asyncio.run(middleware(s or scope(), client.receive, client.send))


# ---- the request body ------------------------------------------------------------------------------


def body_layer(app: App, timeout: float = 5.0) -> RequestBody:
    return RequestBody(app, max_bytes=LIMIT, timeout=timeout)


@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT])
def test_a_chunked_body_up_to_the_limit_reaches_the_app_whole_in_one_message(size: int) -> None:
    app = App()
    client = Client(chunks(b"a" * (size - 3), b"bcd", b""))
    run(body_layer(app), client)
    assert app.messages == [{"type": "http.request", "body": b"a" * (size - 3) + b"bcd", "more_body": False}]
    assert app.calls == 1 and client.status == 200


def test_messages_without_a_body_or_more_body_key_are_empty_and_last() -> None:
    """ASGI lets a client's message leave out ``body`` (empty) and ``more_body`` (False)."""
    app = App()
    client = Client([{"type": "http.request", "more_body": True}, {"type": "http.request", "body": b"{}"}])
    run(body_layer(app), client)
    assert app.messages == [{"type": "http.request", "body": b"{}", "more_body": False}]
    assert client.received == 2 and client.status == 200


def test_a_scope_without_headers_has_none() -> None:
    app = App()
    s = scope()
    del s["headers"]
    client = Client(chunks(b"{}"))
    run(body_layer(app), client, s)
    assert app.body == b"{}" and client.status == 200


def test_a_chunked_body_one_byte_over_the_limit_is_a_413_and_the_rest_is_not_read() -> None:
    app = App()
    client = Client(chunks(b"a" * LIMIT, b"b", b"never read"))
    run(body_layer(app), client)
    assert client.status == 413 and app.calls == 0
    assert client.error() == {"message": f"the request body is larger than {LIMIT} bytes",
                              "type": "invalid_request_error", "param": None, "code": "body_too_large"}  # fmt: skip
    assert client.received == 2  # it stopped at the chunk that went over
    assert_closing_json(client)


def assert_closing_json(client: Client) -> None:
    """A refusal's headers: JSON, its exact length, and the connection closed after it."""
    start = next(m for m in client.sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in client.sent if m["type"] == "http.response.body")
    assert start["headers"] == [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]  # fmt: skip


@pytest.mark.parametrize(("length", "refused"), [(LIMIT, False), (LIMIT + 1, True)])
def test_content_length_over_the_limit_is_refused_before_the_body_is_read(length: int, refused: bool) -> None:
    app = App()
    client = Client(chunks(b"x" * min(length, LIMIT)))
    run(body_layer(app), client, scope({b"content-length": str(length).encode()}))
    if refused:
        assert client.status == 413 and client.received == 0 and app.calls == 0
        assert_closing_json(client)
    else:
        assert client.status == 200 and app.calls == 1


@pytest.mark.parametrize("encoding", [b"gzip", b"GZIP ", b"br", b"deflate"])
def test_a_compressed_body_is_a_415_naming_the_encoding(encoding: bytes) -> None:
    app = App()
    client = Client(chunks(b"{}"))
    run(body_layer(app), client, scope({b"content-encoding": encoding}))
    assert client.status == 415 and app.calls == 0 and client.received == 0
    name = encoding.strip().lower().decode()
    assert client.error() == {"message": f"the request body is compressed ({name}): send it uncompressed JSON",
                              "type": "invalid_request_error", "param": None, "code": "unsupported_encoding"}  # fmt: skip
    assert_closing_json(client)


@pytest.mark.parametrize("encoding", [b"identity", b"Identity", b" identity ", b""])
def test_an_uncompressed_body_goes_through(encoding: bytes) -> None:
    app = App()
    client = Client(chunks(b"{}"))
    run(body_layer(app), client, scope({b"content-encoding": encoding}))
    assert client.status == 200 and app.body == b"{}"


def test_a_body_that_stops_arriving_is_a_408_after_the_timeout() -> None:
    app = App()
    client = Client(chunks(b"ab", b"cd")[:1], stalls=True)  # one chunk with more to come, then nothing
    run(body_layer(app, timeout=0.05), client)
    assert client.status == 408 and app.calls == 0
    assert client.error() == {"message": "the request body did not arrive within 0.05 seconds: send it at once",
                              "type": "invalid_request_error", "param": None, "code": "request_timeout"}  # fmt: skip
    assert_closing_json(client)


def test_a_client_gone_while_sending_the_body_gets_nothing_and_the_app_never_runs() -> None:
    app = App()
    client = Client(chunks(b"ab", b"cd")[:1])  # then the hang-up
    run(body_layer(app), client)
    assert client.sent == [] and app.calls == 0


def test_after_the_body_every_receive_goes_to_the_client_so_a_hang_up_is_seen() -> None:
    app = App(reads_after=2)
    client = Client([*chunks(b"ab", b"cd"), {"type": "http.disconnect"}])
    run(body_layer(app), client)
    assert app.body == b"abcd"
    assert app.later == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]
    assert client.received == 4  # two chunks, then the app's own two receives


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
def test_other_scopes_pass_through_untouched(kind: str) -> None:
    seen: list[dict[str, Any]] = []

    async def app(s: dict, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await send({"type": f"{kind}.answer"})

    client = Client([{"type": f"{kind}.first"}, {"type": f"{kind}.second"}])
    metrics = Metrics()
    run(RequestBody(app, max_bytes=LIMIT, timeout=5.0), client, scope({b"content-encoding": b"gzip"}, kind))
    run(RequestMetrics(app, metrics), client, scope(kind=kind))
    assert seen == [{"type": f"{kind}.first"}, {"type": f"{kind}.second"}]  # the client's, in order
    assert client.sent == [{"type": f"{kind}.answer"}] * 2 and metrics.requests == {}


# ---- the request counters ----------------------------------------------------------------------------


class Route:
    path = "/v1/audio/speech"


def counted(app: Any, metrics: Metrics, route: bool = True) -> Client:
    async def routed(s: dict, receive: Any, send: Any) -> None:
        if route:
            s["route"] = Route()  # what the router leaves in the scope
        await app(s, receive, send)

    client = Client(chunks(b"{}"))
    try:
        run(RequestMetrics(routed, metrics), client)
    except RuntimeError:
        pass
    return client


def test_requests_are_counted_by_route_and_status_and_errors_by_status() -> None:
    metrics = Metrics()
    for status in (200, 200, 400, 503):
        counted(App(status), metrics)
    counted(App(404), metrics, route=False)
    assert metrics.requests == {("/v1/audio/speech", 200): 2, ("/v1/audio/speech", 400): 1,
                                ("/v1/audio/speech", 503): 1, ("other", 404): 1}  # fmt: skip
    assert metrics.errors == {"400": 1, "503": 1, "404": 1}


def test_a_status_of_exactly_400_is_an_error_and_399_is_not() -> None:
    metrics = Metrics()
    counted(App(399), metrics)
    assert metrics.errors == {}
    counted(App(400), metrics)
    assert metrics.errors == {"400": 1}


def test_a_client_that_hung_up_first_is_counted_but_not_as_an_error() -> None:
    metrics = Metrics()
    counted(App(499), metrics)
    assert metrics.requests == {("/v1/audio/speech", 499): 1} and metrics.errors == {}


def test_an_app_that_raises_before_answering_is_counted_as_a_500() -> None:
    metrics = Metrics()
    client = counted(App(raises=True), metrics)
    assert client.sent == []
    assert metrics.requests == {("/v1/audio/speech", 500): 1} and metrics.errors == {"500": 1}
