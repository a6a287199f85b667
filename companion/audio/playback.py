"""Playing replies as they are generated (sounddevice), or writing them to WAV files when there is no device.

The only module that imports sounddevice, and only inside functions: a machine without PortAudio can
still import companion. There is no audio callback: a writer thread hands the audio to the device in
blocking writes, as far ahead as generation allows (up to a 2 s device buffer), so a stalled process
keeps playing what it has handed over. The design and its numbers are in docs/chat.md.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from companion.audio.devices import (
    AudioUnavailable,
    OutputDevice,
    device_error_reason,
    load_sounddevice,
    output_devices,
    resolve_device,
    set_alsa_periods,
)
from companion.audio.io import write_wav
from companion.audio.quiet import stderr_silenced
from companion.oserrors import unique_path

SAMPLE_RATE = 24000
BUFFER_MS = 2000  # the device buffer: how long a stalled process keeps playing (docs/chat.md)
PIECE_MS = 20  # one blocking write: a stop is heard within this
PERIOD_MS = 20  # ALSA period: playback starts once one is written; a blocking write wakes once per period
UNDERRUN_SLACK_S = 0.04  # a piece later than its due time by more than this followed a gap

# ---------------------------------------------------------------- prebuffer


@dataclass
class Prebuffer:
    """How much audio to buffer before playback starts, from the measured generation speed.

    With generation at ``rate`` seconds of audio per second and an utterance of ``E`` seconds,
    starting with ``b`` seconds buffered never runs dry when ``b >= E * (1 - rate)``. Faster than
    real time only the minimum is kept. The speed seen in earlier replies is remembered, so the
    first chunks of a reply (when the current speed is still unknown) are judged by it.
    """

    minimum_s: float = 0.2
    safety: float = 1.25
    rate: float | None = None  # remembered generation speed (audio s / wall s), None until measured

    def threshold(self, expected_s: float | None, current_rate: float | None) -> float:
        rate = _slowest(current_rate, self.rate)
        if rate is None:  # nothing measured yet: wait for the second chunk
            return float("inf")
        if rate >= self.safety:
            return self.minimum_s
        if expected_s is None:  # slow and of unknown length: play once all of it is there
            return float("inf")
        return max(self.minimum_s, expected_s * (1.0 - rate / self.safety))

    def observe(self, rate: float) -> None:
        self.rate = rate if self.rate is None else 0.5 * self.rate + 0.5 * rate


def _slowest(a: float | None, b: float | None) -> float | None:
    known = [r for r in (a, b) if r is not None]
    return min(known) if known else None


# ---------------------------------------------------------------- outputs


@dataclass
class PlayReport:
    seconds: float  # audio played (or written)
    underruns: int
    cancelled: bool
    first_sound_s: float | None  # from play() to the stream starting
    path: Path | None = None  # the WAV file, for WavWriter
    prebuffered_s: float | None = None  # audio generated when the stream started


class AudioOutput(Protocol):
    underruns: int

    def describe(self) -> str: ...
    def play(self, chunks: Iterable[np.ndarray], *, cancel: threading.Event | None = None,
             expected_seconds: float | None = None) -> PlayReport: ...
    def stop(self) -> None: ...


Waiter = Callable[[threading.Event, float], bool]  # wait on an event for up to so many seconds: set?


class _Feed:
    """Audio between the generator and the writer thread: a deque (appends and pops are atomic), None ends it."""

    def __init__(self) -> None:
        self.chunks: collections.deque[np.ndarray | None] = collections.deque()
        self.more = threading.Event()  # set after each append: wakes a writer that found the deque empty
        self.stopped = threading.Event()  # set by Player.stop(): the writer drops the device's buffer and returns
        self.underruns = 0
        self.started_at: float | None = None
        self.prebuffered_s: float | None = None

    def put(self, chunk: np.ndarray | None) -> None:
        self.chunks.append(chunk)
        self.more.set()

    @property
    def halted(self) -> bool:
        return self.stopped.is_set()

    def halt(self) -> None:
        self.stopped.set()
        self.more.set()


class _Writer(threading.Thread):
    """Hands the feed's audio to the device in blocking writes of ``piece`` frames, as fast as it takes them.

    The device buffer (``Player.buffer_ms``) fills as far as generation is ahead, so audio already handed
    over keeps playing while this process is stalled. Between pieces the writer checks ``halted``: a stop
    aborts the stream (which also drops what the audio server holds) within one piece.

    Underruns are counted by the clock: audio written by time t plays until ``anchor + written / rate``;
    a piece that arrives later than that (by more than ``slack_s``) follows a gap. PortAudio's own
    underflow flag counts too (once per gap).
    """

    def __init__(self, stream: Any, feed: _Feed, rate: int, piece: int, slack_s: float,
                 clock: Callable[[], float], wait: Waiter) -> None:
        super().__init__(name="companion-audio-writer", daemon=True)
        self.stream, self.feed, self.rate, self.piece, self.slack_s = stream, feed, rate, piece, slack_s
        self.clock, self.wait = clock, wait
        self.anchor: float | None = None  # when frame 0 would have played, had nothing ever been late
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self._write_all():
                self._drain()
        except BaseException as err:  # noqa: BLE001 - handed to play(), which raises it in its own thread
            self.error = err
        finally:
            if self.feed.halted or self.error is not None:
                with contextlib.suppress(Exception):
                    self.stream.abort()

    def _write_all(self) -> bool:
        """Write until the end marker (True) or a stop (False)."""
        feed, counted_last = self.feed, False
        while not feed.halted:
            if not feed.chunks:
                feed.more.clear()
                if not feed.chunks:
                    feed.more.wait(0.02)
                continue
            chunk = feed.chunks.popleft()
            if chunk is None:
                return True
            for pos in range(0, len(chunk), self.piece):
                if feed.halted:
                    return False
                late = self._late()
                flagged = bool(self.stream.write(chunk[pos : pos + self.piece]))
                if late or (flagged and not counted_last):
                    feed.underruns += 1
                counted_last = late or flagged
                self.written += min(self.piece, len(chunk) - pos)
        return False

    def _late(self) -> bool:
        now = self.clock()
        if self.anchor is None:
            self.anchor = now
            return False
        due = self.anchor + self.written / self.rate
        if now <= due + self.slack_s:
            return False
        self.anchor = now - self.written / self.rate  # playback resumes with this piece
        return True

    def _drain(self) -> None:
        """Wait (stoppably) until everything written has played by the clock, then let the stream finish."""
        end = (self.anchor or self.clock()) + self.written / self.rate
        if not self.wait(self.feed.stopped, max(0.0, end - self.clock())):
            self.stream.stop()  # what is left (the server's own latency) plays out


class Player:
    """Plays a stream of chunks through one blocking OutputStream per utterance.

    ``play`` consumes ``chunks`` (which may be generated on the fly) in the calling thread; once the
    prebuffer is there a writer thread hands them to the device, whose buffer holds up to ``buffer_ms``
    of audio. ``play`` returns when the utterance has been heard or ``stop()``/``cancel`` ends it.

    ``clock`` (monotonic seconds) times generation and playback, and ``wait(event, seconds)`` waits on an
    event for up to that many of the clock's seconds (while the end plays out); tests pass a clock that
    their generator advances, with ``open_stream`` overridden by a stand-in device, so prebuffer,
    underruns and the wait for the end are exact.
    """

    def __init__(self, device: str | int | None = None, sample_rate: int = SAMPLE_RATE,
                 prebuffer_ms: int = 200, tail_silence_ms: int = 100, buffer_ms: int = BUFFER_MS,
                 clock: Callable[[], float] = time.monotonic, wait: Waiter = threading.Event.wait) -> None:
        self.clock, self.wait = clock, wait
        self.sample_rate = sample_rate
        self.device_spec = device
        self.device: int | None = None
        self.prebuffer = Prebuffer(minimum_s=prebuffer_ms / 1000)
        self.buffer_s = buffer_ms / 1000
        self.piece = sample_rate * PIECE_MS // 1000
        self.tail = np.zeros(int(sample_rate * tail_silence_ms / 1000), np.float32)
        self.underruns = 0
        self._stop = threading.Event()
        self._feed: _Feed | None = None

    def check(self) -> Player:
        """Raise AudioUnavailable unless a stream can be opened on the chosen device."""
        sd = load_sounddevice()
        self.device = resolve_device(self.device_spec)
        try:
            with stderr_silenced():  # PortAudio opens the device to check it
                sd.check_output_settings(device=self.device, channels=1, dtype="float32", samplerate=self.sample_rate)
        except (sd.PortAudioError, ValueError) as err:
            raise AudioUnavailable(f"no audio output ({device_error_reason(err)})") from err
        return self

    def describe(self) -> str:
        sd = load_sounddevice()
        try:
            return str(sd.query_devices(self.device, "output")["name"])
        except (sd.PortAudioError, ValueError):
            return "default"

    def stop(self) -> None:
        """End the current utterance now (from any thread): silence within one piece (20 ms)."""
        self._stop.set()
        if self._feed is not None:
            self._feed.halt()

    def play(self, chunks: Iterable[np.ndarray], *, cancel: threading.Event | None = None,
             expected_seconds: float | None = None) -> PlayReport:
        self._stop.clear()
        stopped = (lambda: self._stop.is_set() or cancel.is_set()) if cancel else self._stop.is_set
        feed, writer = _Feed(), None
        self._feed = feed
        start = self.clock()
        first: float | None = None
        generated = first_len = 0.0
        count = 0
        try:
            for chunk in chunks:
                if stopped():
                    break
                if first is None:
                    first, first_len = self.clock(), len(chunk) / self.sample_rate
                feed.put(np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1))
                generated += len(chunk) / self.sample_rate
                count += 1
                rate = _rate(generated - first_len, self.clock() - first, count)
                if writer is None and generated >= self.prebuffer.threshold(expected_seconds, rate):
                    writer = self._start(feed, generated)
                if writer is not None and writer.error is not None:
                    break
            if stopped():
                return self._report(feed, generated, True, start)
            if first is not None:
                self.prebuffer.observe(generated / max(self.clock() - first, 1e-6))
            feed.put(self.tail)
            feed.put(None)
            if writer is None and generated > 0:
                writer = self._start(feed, generated)
            if writer is not None:
                self._wait(writer, feed, stopped)
                _raise_failure(writer)
            return self._report(feed, generated, stopped(), start)
        finally:
            if writer is not None:
                if writer.is_alive():  # leaving early (an error in generation, a stop): silence now
                    feed.halt()
                writer.join()
                with stderr_silenced():
                    writer.stream.close()
            self.underruns += feed.underruns
            self._feed = None

    def _start(self, feed: _Feed, prebuffered_s: float) -> _Writer:
        stream = self.open_stream()
        feed.started_at, feed.prebuffered_s = self.clock(), prebuffered_s
        writer = _Writer(stream, feed, self.sample_rate, self.piece, UNDERRUN_SLACK_S, self.clock, self.wait)
        writer.start()
        return writer

    def open_stream(self) -> Any:
        """A started blocking output stream: ``write(frames) -> underflowed``, ``stop()``, ``abort()``, ``close()``."""
        sd = load_sounddevice()
        try:
            set_alsa_periods(sd, max(2, round(self.buffer_s * 1000 / PERIOD_MS)))
            with stderr_silenced():
                stream = sd.OutputStream(samplerate=self.sample_rate, channels=1, dtype="float32",
                                         device=self.device, latency=self.buffer_s)
                stream.start()
        except sd.PortAudioError as err:
            raise AudioUnavailable(f"cannot open the audio output ({device_error_reason(err)})") from err
        return stream

    def _wait(self, writer: _Writer, feed: _Feed, stopped: Any) -> None:
        while writer.is_alive():
            if stopped():
                feed.halt()
            writer.join(0.01)

    def _report(self, feed: _Feed, seconds: float, cancelled: bool, start: float) -> PlayReport:
        started = feed.started_at
        return PlayReport(seconds, feed.underruns, cancelled, None if started is None else started - start,
                          prebuffered_s=feed.prebuffered_s)


def _raise_failure(writer: _Writer) -> None:
    """An error in the writer thread, raised in play()'s thread (a device error as the program's own)."""
    err = writer.error
    if err is None:
        return
    sd = load_sounddevice()
    if isinstance(err, sd.PortAudioError):
        raise AudioUnavailable(f"the audio output failed ({device_error_reason(err)})") from err
    raise err


def _rate(after_first_s: float, elapsed: float, count: int) -> float | None:
    """Generation speed since the first chunk (which carries the prompt's cost); None before a second one."""
    return after_first_s / max(elapsed, 1e-3) if count > 1 else None


class WavWriter:
    """The fallback output: each reply becomes a WAV file in ``directory``."""

    def __init__(self, directory: Path, sample_rate: int = SAMPLE_RATE) -> None:
        self.directory = directory
        self.sample_rate = sample_rate
        self.underruns = 0

    def describe(self) -> str:
        return f"WAV files: {self.directory}"

    def stop(self) -> None:
        pass

    def play(self, chunks: Iterable[np.ndarray], *, cancel: threading.Event | None = None,
             expected_seconds: float | None = None) -> PlayReport:
        parts = []
        for chunk in chunks:
            if cancel is not None and cancel.is_set():
                break
            parts.append(np.asarray(chunk, dtype=np.float32).reshape(-1))
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        seconds = len(audio) / self.sample_rate
        if (cancel is not None and cancel.is_set()) or not len(audio):
            return PlayReport(seconds, 0, bool(cancel and cancel.is_set()), None)
        self.directory.mkdir(parents=True, exist_ok=True)  # the data folder's audio/ (a user's folder was checked)
        path = unique_path(self.directory, "reply")
        try:
            write_wav(path, audio, self.sample_rate)
        except BaseException:
            path.unlink(missing_ok=True)  # the name was reserved empty: leave nothing behind
            raise
        return PlayReport(seconds, 0, False, None, path)


def open_output(device: str | int | None, fallback_dir: Path, *, sample_rate: int = SAMPLE_RATE,
                prebuffer_ms: int = 200, tail_silence_ms: int = 100) -> tuple[AudioOutput, str | None]:
    """The player when sound works, else the WAV writer and the one warning line to show."""
    try:
        return Player(device, sample_rate, prebuffer_ms, tail_silence_ms).check(), None
    except AudioUnavailable as err:
        return WavWriter(fallback_dir, sample_rate), f"{err}; replies are written as WAV files to {fallback_dir}"


__all__ = ["SAMPLE_RATE", "AudioOutput", "AudioUnavailable", "OutputDevice", "Player", "PlayReport", "Prebuffer",
           "WavWriter", "open_output", "output_devices", "resolve_device"]
