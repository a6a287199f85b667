"""Plain ASGI middlewares (they leave streaming and disconnects alone): request counts, the request body."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from companion.server.errors import error_body
from companion.server.metrics import Metrics


class RequestMetrics:
    """Count every HTTP request by route and status (errors also by status)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.request(route, status)
            if status >= 400 and status != 499:  # 499: the client hung up first (a disconnect, not an error)
                self.metrics.error(str(status))


class BodyTooLarge(Exception):
    pass


class RequestBody:
    """Read the whole request body before the app sees it, within limits, and answer for the client:

    - 413 for a body over ``max_bytes``: at once from Content-Length, or as soon as a chunked body
      grows past it (the connection is then closed: the rest of the body is not read);
    - 408 when the body is not all there ``timeout`` seconds after the headers (a client sending a
      byte at a time), and the connection is closed;
    - 415 for a compressed body (``Content-Encoding`` other than identity).

    The app then receives the body in one message, and every later ``receive()`` goes to the server
    (so a hang-up is still seen while a reply streams)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            await _refuse(send, 415, f"the request body is compressed ({encoding.decode('latin-1')}): send it "
                          "uncompressed JSON", "unsupported_encoding")
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _refuse(send, 413, f"the request body is larger than {self.max_bytes} bytes", "body_too_large")
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except BodyTooLarge:
            await _refuse(send, 413, f"the request body is larger than {self.max_bytes} bytes", "body_too_large")
            return
        except asyncio.TimeoutError:
            await _refuse(send, 408, f"the request body did not arrive within {self.timeout:g} seconds: send it at once",
                          "request_timeout")
            return
        if body is None:  # the client hung up while sending it
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise BodyTooLarge()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    """An error answer sent before the body was read (all of it): the connection closes after it."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
