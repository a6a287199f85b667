"""Playing replies as they are generated (sounddevice), or writing them to WAV files when there is no device.

The only module that imports sounddevice, and only inside functions: a machine without PortAudio can
still import companion. The stream callback only moves data: it takes chunks from a queue, writes
silence when the queue is empty and counts that as an underrun.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from companion.audio.io import write_wav
from companion.errors import CompanionError

SAMPLE_RATE = 24000
NO_PORTAUDIO = (
    "the PortAudio library is not installed (Debian/Ubuntu: sudo apt install libportaudio2; "
    "macOS: brew install portaudio)"
)


class AudioUnavailable(CompanionError):
    """No way to play sound here: no PortAudio, no audio server, or no output device."""


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except OSError as err:  # raised by sounddevice when libportaudio is missing
        raise AudioUnavailable(NO_PORTAUDIO) from err
    return sounddevice


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class OutputDevice:
    index: int
    name: str
    hostapi: str
    channels: int
    sample_rate: float
    is_default: bool


def output_devices() -> list[OutputDevice]:
    """Every device that can play sound; raises AudioUnavailable when PortAudio is missing."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as err:
        raise AudioUnavailable(f"cannot list audio devices ({err})") from err
    default = _default_output(sd)
    return [
        OutputDevice(i, d["name"], hostapis[d["hostapi"]]["name"], d["max_output_channels"],
                     d["default_samplerate"], i == default)
        for i, d in enumerate(devices)
        if d["max_output_channels"] > 0
    ]


def _default_output(sd: ModuleType) -> int | None:
    try:
        index = sd.default.device[1]
    except (sd.PortAudioError, IndexError, TypeError):
        return None
    return index if isinstance(index, int) and index >= 0 else None


def resolve_device(spec: str | int | None) -> int | None:
    """``--output-device``: an index or (part of) a name from ``companion devices``; None is the default."""
    if spec is None or spec == "":
        return None
    devices = output_devices()
    if not devices:
        raise AudioUnavailable("no audio output device found (no audio server running?)")
    if isinstance(spec, int) or re.fullmatch(r"\d+", str(spec)):
        index = int(spec)
        if any(d.index == index for d in devices):
            return index
        raise CompanionError(f"there is no output device {index}: run `companion devices` to list them")
    matches = [d for d in devices if str(spec).lower() in d.name.lower()]
    if len(matches) == 1 or (matches and matches[0].name.lower() == str(spec).lower()):
        return matches[0].index
    if not matches:
        raise CompanionError(f"no output device matches {spec!r}: run `companion devices` to list them")
    names = ", ".join(f"{d.index}: {d.name}" for d in matches)
    raise CompanionError(f"{spec!r} matches several output devices ({names}): give its number instead")


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


class AudioOutput(Protocol):
    underruns: int

    def describe(self) -> str: ...
    def play(self, chunks: Iterable[np.ndarray], *, cancel: threading.Event | None = None,
             expected_seconds: float | None = None) -> PlayReport: ...
    def stop(self) -> None: ...


class _Feed:
    """What the callback plays: chunks in a deque (appends and pops are atomic), None ends the stream."""

    def __init__(self, stop: type[BaseException]) -> None:
        self.stop = stop  # sounddevice.CallbackStop
        self.chunks: collections.deque[np.ndarray | None] = collections.deque()
        self.current: np.ndarray = np.zeros(0, np.float32)
        self.pos = 0
        self.ended = False
        self.halted = False  # set by Player.stop(): silence from the next block on
        self.underruns = 0
        self.done = threading.Event()
        self.started_at: float | None = None

    def callback(self, outdata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        out = outdata[:, 0]
        n = 0
        self.ended = self.ended or self.halted
        while n < frames and not self.ended:
            if self.pos >= len(self.current):
                if not self.chunks:
                    break
                nxt = self.chunks.popleft()
                if nxt is None:
                    self.ended = True
                    break
                self.current, self.pos = nxt, 0
            take = min(frames - n, len(self.current) - self.pos)
            out[n : n + take] = self.current[self.pos : self.pos + take]
            n, self.pos = n + take, self.pos + take
        out[n:] = 0.0
        if status.output_underflow or (n < frames and not self.ended):
            self.underruns += 1
        if self.ended:
            raise self.stop


class Player:
    """Plays a stream of chunks through one OutputStream per utterance.

    ``play`` consumes ``chunks`` (which may be generated on the fly) in the calling thread and
    returns when the utterance has been heard or ``stop()``/``cancel`` ends it (< 50 ms).
    """

    def __init__(self, device: str | int | None = None, sample_rate: int = SAMPLE_RATE,
                 prebuffer_ms: int = 200, tail_silence_ms: int = 100) -> None:
        self.sample_rate = sample_rate
        self.device_spec = device
        self.device: int | None = None
        self.prebuffer = Prebuffer(minimum_s=prebuffer_ms / 1000)
        self.tail = np.zeros(int(sample_rate * tail_silence_ms / 1000), np.float32)
        self.underruns = 0
        self._stop = threading.Event()
        self._feed: _Feed | None = None

    def check(self) -> Player:
        """Raise AudioUnavailable unless a stream can be opened on the chosen device."""
        sd = _sounddevice()
        self.device = resolve_device(self.device_spec)
        try:
            sd.check_output_settings(device=self.device, channels=1, dtype="float32", samplerate=self.sample_rate)
        except (sd.PortAudioError, ValueError) as err:
            raise AudioUnavailable(f"no audio output ({_reason(err)})") from err
        return self

    def describe(self) -> str:
        sd = _sounddevice()
        try:
            return str(sd.query_devices(self.device, "output")["name"])
        except (sd.PortAudioError, ValueError):
            return "default"

    def stop(self) -> None:
        """End the current utterance now (from any thread): the stream goes silent within one block."""
        self._stop.set()
        if self._feed is not None:
            self._feed.halted = True

    def play(self, chunks: Iterable[np.ndarray], *, cancel: threading.Event | None = None,
             expected_seconds: float | None = None) -> PlayReport:
        self._stop.clear()
        stopped = (lambda: self._stop.is_set() or cancel.is_set()) if cancel else self._stop.is_set
        feed, stream = _Feed(_sounddevice().CallbackStop), None
        self._feed = feed
        start = time.monotonic()
        first: float | None = None
        generated = first_len = 0.0
        count = 0
        try:
            for chunk in chunks:
                if stopped():
                    break
                if first is None:
                    first, first_len = time.monotonic(), len(chunk) / self.sample_rate
                feed.chunks.append(np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1))
                generated += len(chunk) / self.sample_rate
                count += 1
                rate = _rate(generated - first_len, first, count)
                if stream is None and generated >= self.prebuffer.threshold(expected_seconds, rate):
                    stream = self._open(feed)
            if stopped():
                return self._report(feed, generated, True, start)
            if first is not None:
                self.prebuffer.observe(generated / max(time.monotonic() - first, 1e-6))
            feed.chunks.extend([self.tail, None])
            if stream is None and generated > 0:
                stream = self._open(feed)
            if stream is not None:
                self._wait(feed, stopped, generated)
            return self._report(feed, generated, stopped(), start)
        finally:
            if stream is not None:
                if not feed.done.is_set():
                    stream.abort()
                stream.close()
            self.underruns += feed.underruns
            self._feed = None

    def _open(self, feed: _Feed) -> Any:
        sd = _sounddevice()
        try:
            stream = sd.OutputStream(samplerate=self.sample_rate, channels=1, dtype="float32", device=self.device,
                                     callback=feed.callback, finished_callback=feed.done.set)
            stream.start()
        except sd.PortAudioError as err:
            raise AudioUnavailable(f"cannot open the audio output ({_reason(err)})") from err
        feed.started_at = time.monotonic()
        return stream

    def _wait(self, feed: _Feed, stopped: Any, seconds: float) -> None:
        deadline = time.monotonic() + seconds + 5.0
        while not feed.done.wait(0.01):
            if stopped() or time.monotonic() > deadline:
                return

    def _report(self, feed: _Feed, seconds: float, cancelled: bool, start: float) -> PlayReport:
        started = feed.started_at
        return PlayReport(seconds, feed.underruns, cancelled, None if started is None else started - start)


def _rate(after_first_s: float, first: float, count: int) -> float | None:
    """Generation speed since the first chunk (which carries the prompt's cost); None before a second one."""
    elapsed = time.monotonic() - first
    return after_first_s / max(elapsed, 1e-3) if count > 1 else None


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if "querying device -1" in text or "Invalid device" in text or "No Default" in text.title():
        return "no audio device or server found: start PulseAudio/PipeWire or pick one with --output-device"
    return text


class WavWriter:
    """The fallback output: each reply becomes a WAV file in ``directory``."""

    def __init__(self, directory: Path, sample_rate: int = SAMPLE_RATE) -> None:
        self.directory = directory
        self.sample_rate = sample_rate
        self.underruns = 0
        self._count = 0

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
        path = self._next_path()
        write_wav(path, audio, self.sample_rate)
        return PlayReport(seconds, 0, False, None, path)

    def _next_path(self) -> Path:
        self._count += 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.directory / f"reply-{stamp}-{self._count:03d}.wav"


def open_output(device: str | int | None, fallback_dir: Path, *, sample_rate: int = SAMPLE_RATE,
                prebuffer_ms: int = 200, tail_silence_ms: int = 100) -> tuple[AudioOutput, str | None]:
    """The player when sound works, else the WAV writer and the one warning line to show."""
    try:
        return Player(device, sample_rate, prebuffer_ms, tail_silence_ms).check(), None
    except AudioUnavailable as err:
        return WavWriter(fallback_dir, sample_rate), f"{err}; replies are written as WAV files to {fallback_dir}"
