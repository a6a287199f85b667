"""The speech server's queue and threads (companion/server/worker.py), driven directly: real threads and
a real event loop, jobs that are plain functions, paced by events the test sets (never by time)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from companion.errors import CompanionError
from companion.server.metrics import Metrics
from companion.server.worker import Job, QueueFull, SpeechWorker

HANG_LIMIT_S = 60  # a bound on waiting for a thread (a hang fails the test; never a timing threshold)


class EventLoop:
    """An asyncio loop in its own thread, as the server's: the worker hands events to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def job(self, key: tuple[str, str] | None = None, **kw: Any) -> Job:
        return Job(self.loop, key=key, **kw)

    def next_event(self, job: Job) -> tuple[str, Any]:
        return asyncio.run_coroutine_threadsafe(job.events.get(), self.loop).result(HANG_LIMIT_S)

    def events(self, job: Job) -> list[tuple[str, Any]]:
        """Every event of ``job`` up to its end."""
        out: list[tuple[str, Any]] = []
        while not out or out[-1][0] != "end":
            out.append(self.next_event(job))
        return out

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG_LIMIT_S)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    yield ev
    ev.close()


@pytest.fixture
def make_worker() -> Iterator[Callable[..., SpeechWorker]]:
    made: list[SpeechWorker] = []

    def make(capacity: int = 4, slots: int = 1, first_audio_ms: Callable[[], float | None] = lambda: None) -> SpeechWorker:
        worker = SpeechWorker(capacity, Metrics(), first_audio_ms, slots=slots)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop(HANG_LIMIT_S)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, "a worker thread did not get there"
        time.sleep(0.002)


class Holding:
    """An action that runs until the test lets it go; records when it ran."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self) -> str:
        self.log.append(f"start {self.name}")
        self.started.set()
        assert self.release.wait(HANG_LIMIT_S)
        self.log.append(f"end {self.name}")
        return self.name


def chunks(n: int, closed: list[bool], *, at: int | None = None, then: Callable[[], None] = lambda: None,
           size: int = 2400) -> Callable[[threading.Event], Iterator[np.ndarray]]:  # fmt: skip
    """A reply of ``n`` chunks; ``then()`` runs just before chunk ``at`` is handed over."""

    def speak(cancel: threading.Event) -> Iterator[np.ndarray]:
        try:
            for i in range(n):
                if i == at:
                    then()
                yield np.full(size, i, np.float32)
        finally:
            closed.append(True)

    return speak


class Reply:
    """A reply that is not a generator: only an explicit close() closes it (dropping it does not)."""

    def __init__(self, n: int, cancel: threading.Event) -> None:
        self.chunks = iter([np.full(2400, i, np.float32) for i in range(n)])
        self.cancel, self.closed = cancel, False

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> np.ndarray:
        return next(self.chunks)

    def close(self) -> None:
        self.closed = True


# ---- the queue: capacity, conversations, order -----------------------------------------------------


def test_the_queue_holds_exactly_its_capacity_and_refuses_one_more(loop: EventLoop, make_worker) -> None:
    worker, ran = make_worker(capacity=2, slots=1), []
    first = Holding("first", ran)
    worker.submit(loop.job(action=first))
    assert first.started.wait(HANG_LIMIT_S)
    waiting = [loop.job(action=lambda i=i: ran.append(f"waited {i}")) for i in range(2)]
    for job in waiting:
        worker.submit(job)
    assert (worker.depth, worker.generating, worker.streams) == (2, 1, 0)
    with pytest.raises(QueueFull):
        worker.submit(loop.job(action=lambda: ran.append("refused")))
    first.release.set()
    for job in waiting:
        assert loop.events(job)[-1] == ("end", None)
    assert ran == ["start first", "end first", "waited 0", "waited 1"]  # in the order accepted; never the refused


def test_a_job_of_a_busy_conversation_waits_even_with_a_thread_free(loop: EventLoop, make_worker) -> None:
    worker, ran = make_worker(capacity=1, slots=2), []
    busy = Holding("a1", ran)
    worker.submit(loop.job(("k", "a"), action=busy))
    assert busy.started.wait(HANG_LIMIT_S)
    second = loop.job(("k", "a"), action=lambda: ran.append("a2"))
    worker.submit(second)  # waits: its conversation is busy (one waiting: the capacity)
    other = Holding("b1", ran)
    worker.submit(loop.job(("k", "b"), action=other))  # another conversation: starts on the free thread
    assert other.started.wait(HANG_LIMIT_S)
    assert (worker.depth, worker.generating) == (1, 2)
    with pytest.raises(QueueFull):  # a third of the busy conversation would be a second one waiting
        worker.submit(loop.job(("k", "a"), action=lambda: ran.append("refused")))
    other.release.set()
    wait_for(lambda: worker.generating == 1)
    assert ran[-1] == "end b1" and "a2" not in ran  # a free thread still does not take a busy conversation's job
    busy.release.set()
    assert loop.events(second) == [("result", None), ("end", None)]
    assert ran == ["start a1", "start b1", "end b1", "end a1", "a2"]


def test_with_every_thread_busy_a_new_conversation_waits_its_turn(loop: EventLoop, make_worker) -> None:
    worker, ran = make_worker(capacity=1, slots=1), []
    busy = Holding("a", ran)
    worker.submit(loop.job(("k", "a"), action=busy))
    assert busy.started.wait(HANG_LIMIT_S)
    worker.submit(loop.job(("k", "b"), action=lambda: ran.append("b")))
    with pytest.raises(QueueFull):
        worker.submit(loop.job(None, action=lambda: ran.append("c")))
    busy.release.set()
    wait_for(lambda: ran[-1:] == ["b"])


def test_jobs_start_in_the_order_accepted_as_their_conversations_allow(loop: EventLoop, make_worker) -> None:
    worker, ran = make_worker(capacity=8, slots=2), []
    with worker.gate:  # every thread stops before its job starts: the whole queue is in place first
        jobs = [loop.job(key, action=lambda name=name: ran.append(name)) for key, name in
                [(("k", "a"), "a1"), (("k", "a"), "a2"), (("k", "b"), "b1"), (None, "x"), (("k", "a"), "a3")]]
        for job in jobs:
            worker.submit(job)
        wait_for(lambda: worker.generating == 2)
        assert worker.depth == 3  # a1 and b1 taken; a2 waits for a1, x and a3 behind it
    for job in jobs:
        loop.events(job)
    assert ran.index("a1") < ran.index("a2") < ran.index("a3")
    assert sorted(ran) == ["a1", "a2", "a3", "b1", "x"]


# ---- leaving the queue ----------------------------------------------------------------------------


def busy_worker(loop: EventLoop, make_worker, capacity: int) -> tuple[SpeechWorker, list[str], Holding]:  # noqa: ANN001
    """A one-thread worker whose thread is inside a job the test lets go (``busy.release``)."""
    worker, ran = make_worker(capacity=capacity, slots=1), []
    busy = Holding("busy", ran)
    worker.submit(loop.job(action=busy))
    assert busy.started.wait(HANG_LIMIT_S)
    return worker, ran, busy


def test_a_withdrawn_job_leaves_at_once_and_its_place_is_free(loop: EventLoop, make_worker) -> None:
    worker, ran, busy = busy_worker(loop, make_worker, capacity=1)
    leaving = loop.job(action=lambda: ran.append("withdrawn ran"))
    worker.submit(leaving)
    worker.withdraw(leaving)
    assert loop.events(leaving) == [("end", None)] and leaving.cancel.is_set() and worker.depth == 0
    after = loop.job(action=lambda: ran.append("after"))
    worker.submit(after)  # the place is free again
    busy.release.set()
    assert loop.events(after) == [("result", None), ("end", None)]
    assert "withdrawn ran" not in ran


def test_a_job_cancelled_while_it_waits_is_skipped_with_one_error(loop: EventLoop, make_worker) -> None:
    worker, ran, busy = busy_worker(loop, make_worker, capacity=2)
    skipped = loop.job(action=lambda: ran.append("skipped ran"))
    worker.submit(skipped)
    skipped.stop()  # the client left, but the job stays in the queue until a thread takes it
    assert worker.depth == 1
    busy.release.set()
    events = loop.events(skipped)
    assert [kind for kind, _ in events] == ["error", "end"]
    assert str(events[0][1]) == "cancelled before it started" and "skipped ran" not in ran


def test_withdrawing_a_running_job_cancels_it(loop: EventLoop, make_worker) -> None:
    worker, closed = make_worker(capacity=1, slots=1), []
    job = loop.job()
    with worker.gate:
        job.speak = chunks(5, closed)
        worker.submit(job)
        wait_for(lambda: worker.streams == 1)
        worker.withdraw(job)  # running, not waiting: cancelled, not removed
        assert worker.generating == 1
    assert loop.events(job) == [("end", None)] and closed == []  # stopped before its first chunk was asked for
    assert worker.metrics.cancelled == 1 and worker.metrics.chunks == 0 and job.emitted == 0


# ---- a reply ---------------------------------------------------------------------------------------


def test_a_whole_reply_counts_its_chunks_seconds_and_first_audio(loop: EventLoop, make_worker) -> None:
    times = iter([120.0, 130.0, 140.0, 150.0])
    worker, closed = make_worker(slots=1, first_audio_ms=lambda: next(times)), []
    job = loop.job(speak=chunks(4, closed))
    before = time.perf_counter()
    worker.submit(job)
    events = loop.events(job)
    took = time.perf_counter() - before
    assert [kind for kind, _ in events] == ["audio"] * 4 + ["end"]
    assert [float(chunk[0]) for _, chunk in events[:4]] == [0, 1, 2, 3]
    m = worker.metrics
    assert (job.emitted, m.chunks, m.audio_seconds, m.cancelled) == (4, 4, pytest.approx(0.4), 0)
    assert job.engine_first_audio_ms == 120.0  # asked at the first chunk only
    assert (m.engine_first_audio.count, m.engine_first_audio.sum) == (1, pytest.approx(0.12))
    assert m.rtf.count == 1 and 0 < m.rtf.sum <= took / 0.4 and closed == [True]  # generation time / audio time
    again = loop.job(speak=chunks(2, closed))
    worker.submit(again)
    loop.events(again)
    assert (m.chunks, m.audio_seconds, m.rtf.count, m.engine_first_audio.count) == (6, pytest.approx(0.6), 2, 2)
    assert again.engine_first_audio_ms == 130.0


def test_a_reply_with_no_audio_observes_no_speed(loop: EventLoop, make_worker) -> None:
    worker = make_worker(slots=1, first_audio_ms=lambda: 50.0)
    job = loop.job(speak=chunks(0, []))
    worker.submit(job)
    assert loop.events(job) == [("end", None)]
    m = worker.metrics
    assert (m.chunks, m.audio_seconds, m.rtf.count, m.engine_first_audio.count, m.cancelled) == (0, 0, 0, 0, 0)
    assert job.engine_first_audio_ms is None


def test_a_cancel_inside_a_reply_stops_it_at_the_next_chunk(loop: EventLoop, make_worker, caplog) -> None:
    worker, closed = make_worker(slots=1), []
    job = loop.job()
    job.speak = chunks(6, closed, at=2, then=job.stop)  # the client leaves while chunk 2 is generated
    with caplog.at_level(logging.INFO, logger="companion.serve"):
        worker.submit(job)
        events = loop.events(job)
    assert [kind for kind, _ in events] == ["audio"] * 3 + ["end"]  # chunk 2 was made: it is sent, no more
    m = worker.metrics
    assert (job.emitted, m.chunks, m.cancelled, m.audio_seconds, m.rtf.count) == (3, 3, 1, 0, 0)
    assert closed == [True]  # the generator was closed: the session puts back what it pruned
    assert [r.getMessage() for r in caplog.records] == ["generation stopped after 0.3 s of audio (the client hung up)"]


def test_the_reply_is_asked_with_the_jobs_cancel_and_closed_when_stopped(loop: EventLoop, make_worker) -> None:
    worker = make_worker(slots=1)
    job, replies = loop.job(), []
    job.speak = lambda cancel: replies.append(Reply(4, cancel)) or replies[-1]
    with worker.gate:
        worker.submit(job)
        wait_for(lambda: worker.streams == 1)
        job.stop()
    assert loop.events(job) == [("end", None)]
    assert replies[0].cancel is job.cancel and replies[0].closed  # closed, not just dropped
    whole = loop.job()
    whole.speak = lambda cancel: replies.append(Reply(2, cancel)) or replies[-1]
    worker.submit(whole)
    assert [kind for kind, _ in loop.events(whole)] == ["audio", "audio", "end"] and replies[1].closed


def test_a_reply_without_close_is_served(loop: EventLoop, make_worker) -> None:
    worker = make_worker(slots=1)
    job = loop.job(speak=lambda cancel: iter([np.zeros(2400, np.float32)]))
    worker.submit(job)
    assert [kind for kind, _ in loop.events(job)] == ["audio", "end"]


def test_holding_the_end_keeps_a_finished_reply_in_its_place(loop: EventLoop, make_worker) -> None:
    worker, closed = make_worker(capacity=0, slots=1), []
    job = loop.job(speak=chunks(2, closed))
    with worker.ending:
        worker.submit(job)
        assert [loop.next_event(job)[0] for _ in range(2)] == ["audio", "audio"]
        wait_for(lambda: closed == [True])  # the reply was generated to its end ...
        assert worker.generating == 1  # ... but has not ended: its place is still taken
        with pytest.raises(QueueFull):
            worker.submit(loop.job(action=lambda: "waits"))
    assert loop.next_event(job) == ("end", None)


def test_a_failure_is_reported_to_its_client_and_the_next_job_is_served(loop: EventLoop, make_worker, caplog) -> None:
    worker, closed = make_worker(slots=1), []

    def broken(cancel: threading.Event) -> Iterator[np.ndarray]:
        try:
            yield np.zeros(2400, np.float32)
            raise ValueError("the engine broke")
        finally:
            closed.append(True)

    with caplog.at_level(logging.INFO, logger="companion.serve"):
        failing = loop.job(speak=broken)
        worker.submit(failing)
        events = loop.events(failing)
        told = loop.job(action=lambda: (_ for _ in ()).throw(CompanionError("a line for the user")))
        worker.submit(told)
        told_events = loop.events(told)
        fine = loop.job(action=lambda: "fine")
        worker.submit(fine)
        assert loop.events(fine) == [("result", "fine"), ("end", None)]
    assert [kind for kind, _ in events] == ["audio", "error", "end"] and isinstance(events[1][1], ValueError)
    assert closed == [True]
    assert [kind for kind, _ in told_events] == ["error", "end"] and str(told_events[0][1]) == "a line for the user"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["speech generation failed: ValueError: the engine broke"]  # a user's line is not logged


# ---- waiting for the client ------------------------------------------------------------------------


def test_all_sent_waits_for_the_client_to_take_every_chunk(loop: EventLoop) -> None:
    job = loop.job()
    assert job.all_sent(0) is True  # nothing emitted: nothing to wait for
    job.emitted = 2
    job.mark_sent()
    assert job.sent == 1
    answer: list[bool] = []
    waiter = threading.Thread(target=lambda: answer.append(job.all_sent(HANG_LIMIT_S)))
    waiter.start()
    job.mark_sent()  # the second chunk's bytes went out: the waiter wakes
    waiter.join(HANG_LIMIT_S)
    assert answer == [True] and not job.cancel.is_set()


@pytest.mark.parametrize("limit", [0.0, 0.05])
def test_a_client_that_does_not_take_its_audio_is_cut_off(loop: EventLoop, limit: float, caplog) -> None:
    job = loop.job()
    job.emitted, job.sent = 3, 2
    with caplog.at_level(logging.WARNING, logger="companion.serve"):
        assert job.all_sent(limit) is False  # nobody takes the last chunk: once the time is up, the reply is cut
    assert job.cancel.is_set()
    kind, err = loop.next_event(job)
    assert kind == "error" and str(err) == "the client did not take the audio in time"
    assert [r.getMessage() for r in caplog.records] == ["a client took more than 0 s to take its audio: its reply is stopped"]


def test_a_cancelled_job_is_not_all_sent(loop: EventLoop) -> None:
    job = loop.job()
    job.emitted = 1
    waiter_answer: list[bool] = []
    waiter = threading.Thread(target=lambda: waiter_answer.append(job.all_sent(HANG_LIMIT_S)))
    waiter.start()
    job.stop()  # wakes the waiter
    waiter.join(HANG_LIMIT_S)
    assert waiter_answer == [False]
    job.emitted, job.sent = 1, 1
    assert job.all_sent(0) is False  # everything sent, but cancelled


def test_an_event_for_a_closed_loop_cancels_the_job() -> None:
    ev = EventLoop()
    job = ev.job()
    ev.close()
    job.emit("audio", np.zeros(1, np.float32))
    assert job.cancel.is_set()


# ---- stopping ----------------------------------------------------------------------------------------


def test_stopping_cancels_what_runs_and_what_waits_and_refuses_new_jobs(loop: EventLoop) -> None:
    worker, closed = SpeechWorker(4, Metrics(), lambda: None, slots=1), []
    running, waiting = loop.job(speak=chunks(100, closed)), loop.job(action=lambda: "never")
    with worker.gate:
        worker.submit(running)
        worker.submit(waiting)
        wait_for(lambda: worker.streams == 1 and worker.depth == 1)
        stopper = threading.Thread(target=worker.stop, args=(HANG_LIMIT_S,))
        stopper.start()
        wait_for(lambda: running.cancel.is_set() and waiting.cancel.is_set())
    stopper.join(HANG_LIMIT_S)
    assert not stopper.is_alive() and not any(t.is_alive() for t in worker._threads)
    assert loop.events(running) == [("end", None)] and closed == [] and running.emitted == 0
    assert [kind for kind, _ in loop.events(waiting)] == ["error", "end"]
    with pytest.raises(CompanionError, match="^the server is shutting down$"):
        worker.submit(loop.job(action=lambda: "late"))


def test_a_worker_has_at_least_one_thread_and_each_is_named(make_worker) -> None:
    assert len(make_worker(slots=0)._threads) == 1
    threads = make_worker(slots=2)._threads
    assert [t.name for t in threads] == ["companion-speech-1", "companion-speech-2"]
    assert all(t.daemon for t in threads)  # a reply stuck in the engine cannot keep the server from exiting


def test_stopping_waits_for_a_stuck_thread_no_longer_than_asked(loop: EventLoop) -> None:
    worker, ran = SpeechWorker(1, Metrics(), lambda: None, slots=1), []
    stuck = Holding("stuck", ran)
    worker.submit(loop.job(action=stuck))
    assert stuck.started.wait(HANG_LIMIT_S)
    worker.stop(0.01)  # returns although the thread is still inside its job
    assert worker._threads[0].is_alive()
    stuck.release.set()
    worker._threads[0].join(HANG_LIMIT_S)
