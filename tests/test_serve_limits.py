"""`companion serve`'s connection limits (issue 20): idle and slow connections are closed, connections
over the cap are refused, repeated log lines are dropped. Short configured limits; every assertion is
on what happened (closed, refused, answered), never on how long it took. The timings are measured by
benchmarks/serve_limits.py (docs/benchmarks.md)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, serve_settings, wait_for

from companion.server.connections import OncePerSecond, connection_cap


def _connect(port: int) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.settimeout(120)  # a bound on a broken test, never the thing measured
    return raw


def _closed_by_server(raw: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while data := raw.recv(65536):
            out += data
    except ConnectionResetError:
        pass
    return out


@pytest.fixture
def strict(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(serve_settings(tiny_model_dir, header_timeout_seconds=0.5, body_timeout_seconds=0.5,
                                     keep_alive_seconds=1))
    try:
        yield live
    finally:
        live.stop()


def test_idle_and_slow_connections_are_closed(strict: LiveServer) -> None:
    port = strict.port
    with _connect(port) as idle:  # connects, says nothing
        assert _closed_by_server(idle) == b""
    with _connect(port) as drip:  # headers that never end
        drip.sendall(b"GET /hea")
        assert _closed_by_server(drip) == b""
    with _connect(port) as slow_body:  # headers at once, then 1 byte of a 100-byte body
        slow_body.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{")
        answer = _closed_by_server(slow_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    with _connect(port) as kept:  # one request, then idle: closed after the keep-alive time
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = _closed_by_server(kept)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ready"}')
    with _connect(port) as second:  # a first request answered, the second's headers never end
        second.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /heal")
        answer = _closed_by_server(second)
        assert answer.count(b"HTTP/1.1 200 ") == 1
    assert httpx.get(f"{strict.url}/health").json() == {"status": "ready"}
    refused = strict.http.get("/metrics").text
    assert 'companion_connections_refused_total{reason="slow_headers"} 4' in refused  # all but the slow body


def test_connections_over_the_cap_are_refused_until_one_closes(tiny_model_dir: Path) -> None:
    live = LiveServer(serve_settings(tiny_model_dir, max_connections=3, header_timeout_seconds=600))
    try:
        connections = live.server.server_state.connections
        held = [_connect(live.port) for _ in range(3)]
        wait_for(lambda: len(connections) == 3, "the server to accept three connections")
        with _connect(live.port) as extra:
            assert _closed_by_server(extra) == b""  # reset at once: nothing read, nothing answered
        assert live.state.refusals.over_cap == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{live.url}/health")
        held.pop().close()
        wait_for(lambda: len(connections) == 2, "the server to see one close")
        assert httpx.get(f"{live.url}/health").json() == {"status": "ready"}
        assert live.state.refusals.over_cap == 2
        for raw in held:
            raw.close()
    finally:
        live.stop()


def test_the_cap_stays_below_the_open_files_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert connection_cap(512) == 256 - 64
        assert connection_cap(100) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_repeated_log_line_is_kept_once_per_interval() -> None:
    logger = logging.getLogger("companion.test-repeats")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(OncePerSecond(interval=3600))  # no second passes in this test, however slow the machine
    logger.propagate = False
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("socket.accept() out of system resource", exc_info=True)
        logger.error("another line")
        logger.error("another line")
        assert [r.getMessage() for r in records] == ["socket.accept() out of system resource", "another line"]
    finally:
        logger.removeHandler(handler)


def test_a_client_that_does_not_take_its_audio_cannot_hold_the_engine() -> None:
    import asyncio

    from companion.server.worker import Job

    loop = asyncio.new_event_loop()
    try:
        job = Job(loop)
        job.emitted = 2
        job.mark_sent()
        assert not job.all_sent(limit=0.0)  # one chunk never left: the wait gives up and stops the job
        assert job.cancel.is_set()
        loop.run_until_complete(asyncio.sleep(0))  # the event the worker handed over
        assert job.events.get_nowait()[0] == "error"  # the reply is cut, never ended as if complete
        done = Job(loop)
        done.emitted = 1
        done.mark_sent()
        assert done.all_sent(limit=0.0) and not done.cancel.is_set()
    finally:
        loop.close()
