"""Reference preparation: any audio file -> mono float32 24 kHz speech at a fixed loudness.

Steps: decode -> mono mixdown -> resample to 24 kHz (soxr HQ) -> trim leading/trailing silence and
shorten long pauses (silero VAD) -> loudness-normalize to a LUFS target under a peak ceiling (pyloudnorm
+ a look-ahead limiter). Every refusal is a one-line CompanionError.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from companion.audio.io import read_audio
from companion.config import ReferenceSettings
from companion.errors import CompanionError

SAMPLE_RATE = 24_000
VAD_RATE = 16_000
# Bump when the preparation changes what it outputs: it is part of the encoded-reference cache key.
PIPELINE_VERSION = 1
EDGE_PAD_SECONDS = 0.1  # silence kept before the first and after the last speech
CROSSFADE_SECONDS = 0.005  # where a pause is shortened, the two sides are cross-faded
MIN_LOUDNESS_SECONDS = 0.4  # BS.1770 gating block: shorter audio has no integrated loudness
# The advice on a reference's length, everywhere it is given (messages, help; the docs say the same).
RECOMMENDED_LENGTH = "1-2 minutes"


@dataclass
class PreparationReport:
    """What preparation did to one file (printed by `voice add` / `voice show`)."""

    source: str
    sample_rate: int  # of the file
    channels: int
    seconds_in: float
    seconds_out: float
    speech_seconds: float
    lufs_in: float | None  # None when the input is too short or silent to measure
    lufs_out: float
    peak_dbfs_out: float

    def summary(self) -> str:
        lufs_in = "n/a" if self.lufs_in is None else f"{self.lufs_in:.1f}"
        return (
            f"{Path(self.source).name}: {self.sample_rate} Hz x{self.channels}, "
            f"{self.seconds_in:.1f} s -> {self.seconds_out:.1f} s (speech {self.speech_seconds:.1f} s), "
            f"loudness {lufs_in} -> {self.lufs_out:.1f} LUFS, peak {self.peak_dbfs_out:.1f} dBFS"
        )


@dataclass
class PreparedAudio:
    """Model-ready reference audio: ``samples`` (n,) float32 at 24 kHz, and one report per source file."""

    samples: np.ndarray
    reports: list[PreparationReport] = field(default_factory=list)
    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def settings_fingerprint(settings: ReferenceSettings) -> dict[str, Any]:
    """Everything that changes the prepared samples (for cache keys)."""
    return {"pipeline": PIPELINE_VERSION, "rate": SAMPLE_RATE, **settings.model_dump(mode="json")}


def prepare_reference(path: str | os.PathLike[str], settings: ReferenceSettings) -> PreparedAudio:
    """Decode and prepare one reference file. Raises CompanionError for unusable input."""
    path = Path(path)
    raw, rate = read_audio(path)
    mono = raw.mean(axis=1, dtype=np.float32) if raw.shape[1] > 1 else raw[:, 0]
    if not np.any(mono):
        raise CompanionError(f"{path}: contains only digital silence: pick the file that has the speech in it")
    audio = _resample(mono, rate)
    lufs_in = _loudness(audio)
    segments = detect_speech(audio)
    speech = sum(end - start for start, end in segments) / SAMPLE_RATE
    if speech < max(settings.min_speech_seconds, 1e-9):
        raise CompanionError(
            f"{path}: too little speech ({speech:.1f} s of speech in {len(raw) / rate:.1f} s of audio), "
            f"at least {settings.min_speech_seconds:.1f} s needed: "
            f"use a longer recording of clear speech ({RECOMMENDED_LENGTH} is best)"
        )
    if settings.trim_silence:
        audio = _trim(audio, segments, settings.max_pause_seconds)
    if len(audio) < MIN_LOUDNESS_SECONDS * SAMPLE_RATE:
        raise CompanionError(f"{path}: too short after trimming silence: use a longer recording of clear speech")
    audio, lufs_out = normalize_loudness(audio, settings.target_lufs, settings.peak_dbfs)
    report = PreparationReport(
        source=str(path),
        sample_rate=rate,
        channels=raw.shape[1],
        seconds_in=len(raw) / rate,
        seconds_out=len(audio) / SAMPLE_RATE,
        speech_seconds=speech,
        lufs_in=lufs_in,
        lufs_out=lufs_out,
        peak_dbfs_out=_dbfs(float(np.abs(audio).max())),
    )
    return PreparedAudio(audio, [report])


def prepare_references(paths: list[Path], settings: ReferenceSettings) -> PreparedAudio:
    """Prepare several files of one speaker and join them with a pause of ``max_pause_seconds``."""
    if not paths:
        raise CompanionError("no reference audio given: add at least one audio file")
    parts = [prepare_reference(p, settings) for p in paths]
    gap = np.zeros(int(settings.max_pause_seconds * SAMPLE_RATE), dtype=np.float32)
    pieces: list[np.ndarray] = []
    for i, part in enumerate(parts):
        pieces.extend([gap, part.samples] if i else [part.samples])
    return PreparedAudio(np.concatenate(pieces), [r for part in parts for r in part.reports])


# --- resampling and loudness --------------------------------------------------------------------


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def _dbfs(peak: float) -> float:
    return 20.0 * float(np.log10(max(peak, 1e-12)))


def _loudness(audio: np.ndarray) -> float | None:
    """Integrated loudness (LUFS, BS.1770); None when too short or silent to measure."""
    import pyloudnorm  # scipy: imported on first use, so the CLI starts fast

    if len(audio) < MIN_LOUDNESS_SECONDS * SAMPLE_RATE:
        return None
    value = float(pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(audio.astype(np.float64)))
    return value if np.isfinite(value) else None


def normalize_loudness(audio: np.ndarray, target_lufs: float, peak_dbfs: float) -> tuple[np.ndarray, float]:
    """Gain to ``target_lufs`` with peaks held under ``peak_dbfs``; returns (audio, measured LUFS)."""
    ceiling = 10.0 ** (peak_dbfs / 20.0)
    out = audio.astype(np.float32)
    measured = _loudness(out)
    if measured is None:
        raise CompanionError("the reference has no measurable loudness: use a recording of clear speech")
    for _ in range(3):  # the limiter lowers loudness a little; gain again until on target
        out = _limit(out * np.float32(10.0 ** ((target_lufs - measured) / 20.0)), ceiling)
        measured = _loudness(out)
        assert measured is not None
        if abs(measured - target_lufs) < 0.1:
            break
    return out, measured


def _limit(audio: np.ndarray, ceiling: float) -> np.ndarray:
    """A look-ahead peak limiter: a smooth gain curve that keeps every sample under ``ceiling``.

    The gain each sample needs is spread over +-5 ms with a minimum filter, then smoothed with a
    moving average no wider than that window, so the smoothed gain is still low enough everywhere.
    """
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    if float(np.abs(audio).max()) <= ceiling:
        return audio
    hold = int(CROSSFADE_SECONDS * SAMPLE_RATE)
    need = np.minimum(1.0, ceiling / np.maximum(np.abs(audio), 1e-12))
    gain = uniform_filter1d(minimum_filter1d(need, size=2 * hold + 1), size=hold + 1)
    return np.clip(audio * gain.astype(np.float32), -ceiling, ceiling)


# --- voice activity ------------------------------------------------------------------------------

_vad_lock = threading.Lock()
_vad_model: Any = None


def _silero() -> Any:
    """The silero_vad package. Importing it sets torch's global CPU thread count to 1 (a side effect
    of its model module): the count the command chose is put back, so preparing a reference never
    changes how fast the model runs afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        import silero_vad
    finally:
        torch.set_num_threads(threads)
    return silero_vad


def _vad() -> Any:
    """silero-vad's model (shipped in its wheel), loaded once on first use."""
    global _vad_model
    if _vad_model is None:
        with warnings.catch_warnings():  # its loader uses deprecated importlib/torch.jit calls
            warnings.simplefilter("ignore", DeprecationWarning)
            _vad_model = _silero().load_silero_vad()
    return _vad_model


def detect_speech(audio: np.ndarray) -> list[tuple[int, int]]:
    """Speech regions of 24 kHz ``audio`` as (start, end) sample indices at 24 kHz."""
    import torch

    get_speech_timestamps = _silero().get_speech_timestamps
    peak = float(np.abs(audio).max())
    if peak == 0.0:
        return []
    # The VAD runs at 16 kHz on a peak-normalized copy, so quiet recordings are judged like loud ones.
    probe = soxr.resample(audio / peak * 0.9, SAMPLE_RATE, VAD_RATE, quality="HQ").astype(np.float32)
    with _vad_lock, torch.inference_mode():
        stamps = get_speech_timestamps(torch.from_numpy(probe), _vad(), sampling_rate=VAD_RATE)
    scale = SAMPLE_RATE / VAD_RATE
    return [(int(s["start"] * scale), min(len(audio), int(s["end"] * scale))) for s in stamps]


def _trim(audio: np.ndarray, segments: list[tuple[int, int]], max_pause: float) -> np.ndarray:
    """Keep speech plus a little padding; pauses longer than ``max_pause`` seconds become ``max_pause``."""
    pad = int(EDGE_PAD_SECONDS * SAMPLE_RATE)
    half = int(max_pause * SAMPLE_RATE / 2)
    spans: list[list[int]] = [[max(0, segments[0][0] - pad), segments[0][1]]]
    for start, end in segments[1:]:
        if start - spans[-1][1] > 2 * half:  # a long pause: keep its two ends only
            spans[-1][1] += half
            spans.append([start - half, end])
        else:
            spans[-1][1] = end
    spans[-1][1] = min(len(audio), spans[-1][1] + pad)
    return _join([audio[a:b] for a, b in spans])


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    """Concatenate with a short linear cross-fade at each cut (no clicks)."""
    out = [pieces[0]]
    for piece in pieces[1:]:
        prev = out.pop()
        k = min(int(CROSSFADE_SECONDS * SAMPLE_RATE), len(prev), len(piece))
        ramp = np.linspace(0.0, 1.0, k, dtype=np.float32)
        out += [prev[: len(prev) - k], prev[len(prev) - k :] * (1 - ramp) + piece[:k] * ramp, piece[k:]]
    return np.concatenate(out).astype(np.float32, copy=False)
