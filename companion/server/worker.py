"""One engine, many clients: a bounded FIFO of jobs and the one thread that runs them.

A job is either speech (a function that returns an iterator of audio chunks) or an action on a
conversation (a function that returns a value). Jobs run in the order they were accepted; a job
offered while ``capacity`` others wait is refused (the caller answers 429). The thread hands results
to the event loop through an asyncio queue per job. Setting a job's ``cancel`` (the client hung up,
the server stops) makes a waiting job be skipped and a running one stop at its next chunk: the same
``threading.Event`` the session and the engine check between frames.

``engine_lock`` is held while a chunk is generated (and while a job starts: loading its voice may
encode a reference). Holding it from outside pauses generation between two chunks: tests use that
as a deterministic gate instead of timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from companion.errors import CompanionError
from companion.server.metrics import Metrics

log = logging.getLogger("companion.serve")

SAMPLE_RATE = 24000
SEND_WAIT_SECONDS = 120.0  # the longest a conversation's segment waits for its audio to be sent


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """``speak(cancel)`` -> audio chunks, or ``action()`` -> a value; results arrive in ``events``."""

    loop: asyncio.AbstractEventLoop
    speak: Callable[[threading.Event], Iterator[np.ndarray]] | None = None
    action: Callable[[], Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    finished: bool = False  # set in the event loop when the "end" event has been taken
    engine_first_audio_ms: float | None = None
    emitted: int = 0  # audio chunks handed to the event loop (worker thread)
    sent: int = 0  # of those, the ones whose bytes were sent to the client (event loop)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def mark_sent(self) -> None:
        """From the event loop: one more audio chunk's bytes (maybe none yet) went to the client."""
        with self._progress:
            self.sent += 1
            self._progress.notify_all()

    def stop(self) -> None:
        """Cancel the job (the client hung up, the server stops); wakes ``all_sent``."""
        with self._progress:
            self.cancel.set()
            self._progress.notify_all()

    def all_sent(self, limit: float = SEND_WAIT_SECONDS) -> bool:
        """From the worker thread: wait until every chunk emitted so far was sent; False if cancelled first,
        or if the client took more than ``limit`` seconds (then the job is cancelled: a client that does not
        read cannot hold the engine)."""
        deadline = time.monotonic() + limit
        with self._progress:
            while self.sent < self.emitted and not self.cancel.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("a client took more than %.0f s to take its audio: its reply is stopped", limit)
                    self.cancel.set()
                    self.emit("error", CompanionError("the client did not take the audio in time"))  # cut, not ended
                    break
                self._progress.wait(min(1.0, left))
            return not self.cancel.is_set()

    def emit(self, kind: str, value: Any = None) -> None:
        """From the worker thread: hand one event to the event loop (kinds: audio, result, error, end)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.stop()


class SpeechWorker:
    def __init__(self, capacity: int, metrics: Metrics, first_audio_ms: Callable[[], float | None]) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self._first_audio_ms = first_audio_ms  # the engine's timing of the chunk just generated
        self.engine_lock = threading.Lock()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="companion-speech", daemon=True)
        self._thread.start()

    # ---- from the event loop

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull when ``capacity`` jobs already wait (CompanionError when stopping)."""
        with self._cond:
            if self._stopping:
                raise CompanionError("the server is shutting down")
            if len(self._jobs) >= self.capacity and (self.current is not None or self._jobs):
                raise QueueFull()
            self._jobs.append(job)
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Cancel ``job``; if it still waits, it leaves the queue at once (its place is free again)."""
        job.stop()
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                job.emit("end")

    @property
    def depth(self) -> int:
        """Jobs waiting (not the one running)."""
        return len(self._jobs)

    @property
    def generating(self) -> int:
        return int(self.current is not None)

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what waits and what runs, and end the thread."""
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.stop()
            if self.current is not None:
                self.current.stop()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the worker thread

    def _next(self) -> Job | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                return None
            self.current = self._jobs.popleft()
            return self.current

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                if job.cancel.is_set():  # the client left (or the server stops) while it waited
                    job.emit("error", CompanionError("cancelled before it started"))
                elif job.action is not None:
                    with self.engine_lock:
                        job.emit("result", job.action())
                else:
                    self._speak(job)
            except Exception as err:  # noqa: BLE001 - reported to the client; the worker keeps serving
                if not isinstance(err, CompanionError):
                    log.error("speech generation failed: %s: %s", type(err).__name__, err)
                job.emit("error", err)
            finally:
                with self._cond:
                    self.current = None  # before "end": a client that has its whole reply sees the engine free
                job.emit("end")

    def _speak(self, job: Job) -> None:
        assert job.speak is not None
        start, samples, chunks = time.perf_counter(), 0, None
        try:
            with self.engine_lock:
                chunks = job.speak(job.cancel)
            while True:
                with self.engine_lock:
                    if job.cancel.is_set():
                        break
                    chunk = next(chunks, None)
                    if chunk is not None and samples == 0:
                        job.engine_first_audio_ms = self._first_audio_ms()
                if chunk is None:
                    break
                samples += len(chunk)
                self.metrics.add("chunks")
                job.emitted += 1
                job.emit("audio", chunk)
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                with self.engine_lock:
                    chunks.close()  # a generator stopped early: the session puts back what it pruned
        if job.cancel.is_set():
            self.metrics.add("cancelled")
            log.info("generation stopped after %.1f s of audio (the client hung up)", samples / SAMPLE_RATE)
            return
        if samples:
            seconds = samples / SAMPLE_RATE
            self.metrics.add("audio_seconds", seconds)
            self.metrics.observe("rtf", (time.perf_counter() - start) / seconds)
        if job.engine_first_audio_ms is not None:
            self.metrics.observe("engine_first_audio", job.engine_first_audio_ms / 1000)
