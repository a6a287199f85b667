"""The turn worker: generation and playback in a background thread, so the prompt stays usable.

Turns submitted while one is speaking wait in a queue. ``cancel()`` stops the current turn's
generation and playback and drops the queued ones. The worker reports what happened through
``on_event`` (called from its thread); it knows nothing of prompt_toolkit or rich.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from companion.audio.playback import AudioOutput, PlayReport
from companion.errors import CompanionError

SAMPLE_RATE = 24000

# speak(text, cancel) -> audio chunks; estimate(text) -> expected seconds (for the prebuffer)
SpeakFn = Callable[[str, threading.Event], Iterator[np.ndarray]]
EventKind = Literal["started", "done", "cancelled", "error"]


@dataclass
class TurnStats:
    text: str
    first_chunk_s: float | None = None  # submit -> first audio chunk generated (latency)
    generation_s: float = 0.0  # time spent generating
    audio_s: float = 0.0
    underruns: int = 0
    first_sound_s: float | None = None  # playback start after the turn began
    path: str | None = None  # WAV file written instead of playing
    reply: Any = None  # for a reply an LLM wrote: its companion.talkback.ReplyTiming

    @property
    def rtf(self) -> float | None:
        """Real-time factor of generation: seconds to generate one second of audio."""
        return self.generation_s / self.audio_s if self.audio_s else None


@dataclass
class TurnEvent:
    kind: EventKind
    stats: TurnStats
    message: str = ""  # the error line, for kind == "error"
    elapsed_s: float = 0.0  # for "cancelled": from cancel() to the turn having stopped


@dataclass
class _Turn:
    text: str
    action: Callable[[], None] | None = None  # a queued command instead of text to speak
    cancel: threading.Event = field(default_factory=threading.Event)


class TurnWorker:
    def __init__(self, speak: SpeakFn, output: AudioOutput, on_event: Callable[[TurnEvent], None],
                 estimate: Callable[[str], float] | None = None, debug: bool = False,
                 after_each: Callable[[], None] | None = None) -> None:
        self.debug = debug
        self._after_each = after_each
        self._speak = speak
        self.output = output
        self._on_event = on_event
        self._estimate = estimate
        self._queue: queue.Queue[_Turn | None] = queue.Queue()
        self._current: _Turn | None = None
        self._unfinished = 0  # jobs submitted and not yet done or dropped (guarded by _lock)
        self._cancelled_at: float | None = None
        self._lock = threading.Lock()
        self.generating = False
        self.history: list[TurnStats] = []
        self._thread = threading.Thread(target=self._run, name="companion-turns", daemon=True)
        self._thread.start()

    # ---- called from the UI thread

    def submit(self, text: str) -> None:
        self._put(_Turn(text))

    def submit_action(self, label: str, action: Callable[[], None]) -> None:
        """Run ``action`` in the worker after the turns queued before it (commands that change the session)."""
        self._put(_Turn(label, action))

    def _put(self, turn: _Turn) -> None:
        with self._lock:
            self._unfinished += 1
        self._queue.put(turn)

    @property
    def busy(self) -> bool:
        return self._unfinished > 0

    @property
    def remaining(self) -> int:
        """Turns and queued commands not finished yet (the current one included)."""
        return self._unfinished

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def state(self) -> str:
        if self._current is None or self._current.action is not None:
            return "idle"
        return "generating" if self.generating else "playing"

    def cancel(self) -> bool:
        """Stop the current turn and drop queued ones; True when there was something to stop."""
        dropped = self._drain()
        with self._lock:
            turn = self._current
            if turn is not None:
                self._cancelled_at = time.monotonic()
                turn.cancel.set()
        if turn is not None:
            self.output.stop()
        return turn is not None or dropped > 0

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.cancel()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _drain(self) -> int:
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if item is None:  # keep a pending close
                self._queue.put(None)
                return dropped
            dropped += 1
            with self._lock:
                self._unfinished -= 1

    # ---- the worker thread

    def _run(self) -> None:
        while True:
            turn = self._queue.get()
            if turn is None:
                return
            with self._lock:
                self._current, self._cancelled_at = turn, None
                # A turn is "generating" from its start (its voice and prompt are prepared before the
                # first chunk) until the last chunk; only then does the toolbar say "playing".
                self.generating = turn.action is None
            try:
                if turn.action is not None:
                    turn.action()
                else:
                    self._on_event(self._play(turn))
            except Exception as err:  # the turn fails, the REPL goes on; the event carries the one line
                message = traceback.format_exc().rstrip() if self.debug else _one_line(err)
                self._on_event(TurnEvent("error", TurnStats(turn.text), message))
            finally:
                self._finish_job()

    def _finish_job(self) -> None:
        if self._after_each is not None:
            try:
                self._after_each()
            except Exception:  # the toolbar keeps its last values
                pass
        self.generating = False
        with self._lock:
            self._current = None
            self._unfinished -= 1

    def _play(self, turn: _Turn) -> TurnEvent:
        stats = TurnStats(turn.text)
        self._on_event(TurnEvent("started", stats))
        expected = self._estimate(turn.text) if self._estimate else None
        source = self._speak(turn.text, turn.cancel)
        stats.reply = getattr(source, "timing", None)
        try:
            with closing(self._timed_chunks(turn, stats, source)) as chunks:
                report: PlayReport = self.output.play(chunks, cancel=turn.cancel, expected_seconds=expected)
        finally:
            getattr(source, "close", lambda: None)()
        stats.underruns, stats.first_sound_s = report.underruns, report.first_sound_s
        stats.path = str(report.path) if report.path else None
        if failure := getattr(source, "error", None):  # an LLM that failed mid-reply: after what was heard
            if stats.audio_s:
                self.history.append(stats)
            return TurnEvent("error", stats, _one_line(failure))
        if report.cancelled or turn.cancel.is_set():
            since = self._cancelled_at
            return TurnEvent("cancelled", stats, elapsed_s=time.monotonic() - since if since else 0.0)
        self.history.append(stats)
        return TurnEvent("done", stats)

    def _timed_chunks(self, turn: _Turn, stats: TurnStats, source: Iterator[np.ndarray]) -> Generator[np.ndarray, None, None]:
        """The session's chunks, timing generation (the time spent inside the generator)."""
        start = time.monotonic()
        self.generating = True
        gen = iter(source)
        try:
            while True:
                t0 = time.monotonic()
                chunk = next(gen, None)
                stats.generation_s += time.monotonic() - t0
                if chunk is None or turn.cancel.is_set():
                    return
                if stats.first_chunk_s is None:
                    stats.first_chunk_s = time.monotonic() - start
                stats.audio_s += len(chunk) / SAMPLE_RATE
                yield chunk
        finally:
            self.generating = False
            getattr(gen, "close", lambda: None)()  # a cancelled turn's generator ends now, not at GC


def _one_line(err: BaseException) -> str:
    if isinstance(err, CompanionError):
        return str(err)
    if isinstance(err, OSError):  # a reply written to a full disk, a folder gone read-only: the user's machine
        from companion.oserrors import describe

        return describe(err)
    return f"unexpected {type(err).__name__}: {err} (run with --debug for the traceback, and please report it)"
