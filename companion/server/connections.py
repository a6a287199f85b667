"""Connection limits uvicorn does not have: a cap on open connections and a time limit on headers.

uvicorn already closes a connection idle between two requests (``timeout_keep_alive``) and bounds the
size of the headers (h11's ``max_incomplete_event_size``). It has no limit on how many connections
are open (``limit_concurrency`` answers 503 only once a request arrives, and counts idle sockets, so
it would turn ``/health`` away too) and none on how long a client may take to send its headers (an
idle new connection, or headers dripped a byte at a time, are held forever). This h11 protocol adds:

- at most ``max_connections`` open: one more is reset the moment it is accepted (no bytes read or
  written, nothing logged), so refusing costs nothing and the process never runs out of file
  descriptors (the cap is kept below the open-files limit, see ``connection_cap``);
- ``header_timeout`` seconds to send a request's headers, counted from the connection (or from the
  end of the previous response): then the connection is closed without a reply.

The body's time limit is the app's (companion/server/middleware.py answers 408).
"""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

FD_RESERVE = 64  # descriptors kept for the history database, voice files, the model and logs


def connection_cap(configured: int) -> int:
    """``configured``, lowered so that it fits the process's open-files limit with a reserve."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, int(soft) - FD_RESERVE))


class Refusals:
    """How many connections were reset at once and how many were closed for slow headers."""

    def __init__(self) -> None:
        self.over_cap = 0
        self.slow_headers = 0


def guarded_protocol(max_connections: int, header_timeout: float, refusals: Refusals) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the cap and the header time limit (pass it as ``Config(http=...)``)."""

    class GuardedH11Protocol(H11Protocol):
        _made = False
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                refusals.over_cap += 1
                transport.abort()  # type: ignore[attr-defined]
                return
            self._made = True
            super().connection_made(transport)  # type: ignore[arg-type]
            self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._made:
                return
            self._stop_waiting()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._wait_for_headers()  # the next request's headers get the same time

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                refusals.slow_headers += 1
                self.transport.close()

    return GuardedH11Protocol


class OncePerSecond(logging.Filter):
    """Lets a line (by logger and text) through at most once a second, dropping the repeats:
    a failure that repeats in a loop (out of file descriptors, say) cannot fill the disk with the log."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) > 1000:  # only lines from the last second matter
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._last[key] = now
        return True


LOGGERS = ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access", "companion.serve")


def limit_log_repeats() -> OncePerSecond:
    """Install one ``OncePerSecond`` on the server's loggers (idempotent); returns it."""
    for name in LOGGERS:
        for f in logging.getLogger(name).filters:
            if isinstance(f, OncePerSecond):
                return f
    once = OncePerSecond()
    for name in LOGGERS:
        logging.getLogger(name).addFilter(once)
    return once
