"""One engine, many clients: a bounded FIFO of jobs and the speech threads that run them.

    event loop: submit(job) --> [ FIFO of waiting jobs ]          (refused with 429 past ``capacity``)
                                    |  a free thread takes the first job whose conversation is free
                                    v
    speech threads 1..slots (``engine.max_batch``): job.speak(cancel) -> chunks --emit--> event loop
                                    |  each thread drives one engine stream; the engine generates
                                    v  the streams together, frame by frame
                                  client

A job is either speech (a function that returns an iterator of audio chunks) or an action on a
conversation (a function that returns a value). The promise: the jobs of one conversation run one at
a time, in the order they were accepted (its session is never touched by two threads); jobs of other
conversations, and one-shot requests, run beside them, up to ``slots`` at once, and start in the
order they were accepted whenever their conversation allows. A job offered while ``capacity`` others
would wait is refused (the caller answers 429). Each thread hands results to the event loop through an
asyncio queue per job. Setting a job's ``cancel`` (the client hung up, the server stops) makes a
waiting job be skipped and a running one stop at its next chunk: the same ``threading.Event`` the
session and the engine check between frames; the other jobs go on untouched.

Two locks every speech thread passes through (it never holds them while working), so that tests
pause the threads deterministically instead of by timing:
``gate``, before a job starts and before each chunk it takes from the engine: holding it pauses every
thread at its next step; ``ending``, before a job's end is announced: holding it keeps every reply
from ending (and its place from being freed) while its audio still flows.
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
    key: tuple[str, str] | None = None  # (namespace, conversation): its jobs run one at a time; None: one-shot
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
    def __init__(self, capacity: int, metrics: Metrics, first_audio_ms: Callable[[], float | None],
                 slots: int) -> None:
        self.capacity = capacity
        self.slots = max(1, slots)
        self.metrics = metrics
        self._first_audio_ms = first_audio_ms  # the engine's timing of the chunk just generated (this thread's)
        self.gate = threading.Lock()
        self.ending = threading.Lock()
        self._jobs: deque[Job] = deque()
        self._running: list[Job] = []
        self._busy: set[tuple[str, str]] = set()  # the conversations of the running jobs
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"companion-speech-{i + 1}", daemon=True)
                         for i in range(self.slots)]
        for thread in self._threads:
            thread.start()

    # ---- from the event loop

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull when it would be one more than ``capacity`` waiting jobs
        (CompanionError when stopping)."""
        with self._cond:
            if self._stopping:
                raise CompanionError("the server is shutting down")
            if self._left_waiting([*self._jobs, job]) > self.capacity:
                raise QueueFull()
            self._jobs.append(job)
            self._cond.notify_all()

    def withdraw(self, job: Job) -> None:
        """Cancel ``job``; if it still waits, it leaves the queue at once (its place is free again)."""
        job.stop()
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                job.emit("end")
                self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Jobs waiting (not those running)."""
        return len(self._jobs)

    @property
    def generating(self) -> int:
        """Jobs running now (0 to ``slots``)."""
        return len(self._running)

    @property
    def streams(self) -> int:
        """Replies being spoken now (each one stream of the engine's; at most ``slots``)."""
        return sum(1 for job in list(self._running) if job.speak is not None)

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what waits and what runs, and end the threads."""
        with self._cond:
            self._stopping = True
            for job in [*self._jobs, *self._running]:
                job.stop()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ---- scheduling (under ``_cond``)

    def _startable(self, jobs: list[Job] | deque[Job], busy: set[tuple[str, str]], free: int) -> list[Job]:
        """Of ``jobs`` (in order), those that free threads would take now: at most ``free``, each of a
        conversation not busy and not taken by an earlier one."""
        taken: list[Job] = []
        busy = set(busy)
        for job in jobs:
            if len(taken) >= free:
                break
            if job.key is None or job.key not in busy:
                taken.append(job)
                if job.key is not None:
                    busy.add(job.key)
        return taken

    def _left_waiting(self, jobs: list[Job]) -> int:
        return len(jobs) - len(self._startable(jobs, self._busy, self.slots - len(self._running)))

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                ready = self._startable(self._jobs, self._busy, 1)
                if ready:
                    job = ready[0]
                    self._jobs.remove(job)
                    self._running.append(job)
                    if job.key is not None:
                        self._busy.add(job.key)
                    return job
                if self._stopping and not self._jobs:
                    return None
                self._cond.wait()

    def _finished(self, job: Job) -> None:
        with self._cond:
            self._running.remove(job)
            if job.key is not None:
                self._busy.discard(job.key)
            self._cond.notify_all()  # a job of this conversation may start now

    # ---- the speech threads

    def _pass_gate(self, gate: threading.Lock | None = None) -> None:
        with gate or self.gate:
            pass

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                if job.cancel.is_set():  # the client left (or the server stops) while it waited
                    job.emit("error", CompanionError("cancelled before it started"))
                elif job.action is not None:
                    self._pass_gate()
                    job.emit("result", job.action())
                else:
                    self._speak(job)
            except Exception as err:  # noqa: BLE001 - reported to the client; the worker keeps serving
                if not isinstance(err, CompanionError):
                    log.error("speech generation failed: %s: %s", type(err).__name__, err)
                job.emit("error", err)
            finally:
                self._pass_gate(self.ending)
                self._finished(job)  # before "end": a client that has its whole reply sees its place free
                job.emit("end")

    def _speak(self, job: Job) -> None:
        assert job.speak is not None
        start, samples, chunks = time.perf_counter(), 0, None
        self._pass_gate()
        try:
            chunks = job.speak(job.cancel)
            while True:
                self._pass_gate()
                if job.cancel.is_set():
                    break
                chunk = next(chunks, None)
                if chunk is None:
                    break
                if samples == 0:
                    job.engine_first_audio_ms = self._first_audio_ms()
                samples += len(chunk)
                self.metrics.add("chunks")
                job.emitted += 1
                job.emit("audio", chunk)
        finally:
            if chunks is not None and hasattr(chunks, "close"):
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
