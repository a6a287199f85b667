"""Audio for the speaker encoder: any file the project reads -> mono float32 at 16 kHz, with its bandwidth."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import soxr

from companion.audio.io import read_audio

RATE = 16_000  # the speaker encoder's rate: it hears 0-8 kHz
HIGH_BAND_HZ = 4_000.0
# Share of the energy above 4 kHz under which a clip is too band-limited to judge. Full-band speech has
# about 1% there (0.75-1.0% on the fixtures); telephone-band audio (8 kHz sampling) has none.
MIN_HIGH_BAND_SHARE = 0.001


@dataclass
class Clip:
    """``samples`` (n,) float32 mono at 16 kHz; ``source_rate`` of the file it came from."""

    name: str
    samples: np.ndarray
    source_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / RATE

    @cached_property
    def high_band_share(self) -> float:
        """Share of the signal's energy between 4 and 8 kHz (0 for silence)."""
        spectrum = np.abs(np.fft.rfft(self.samples.astype(np.float64))) ** 2
        total = float(spectrum.sum())
        if total == 0.0:
            return 0.0
        freqs = np.fft.rfftfreq(len(self.samples), 1.0 / RATE)
        return float(spectrum[freqs >= HIGH_BAND_HZ].sum()) / total

    @property
    def band_limited(self) -> str | None:
        """Why the clip is too band-limited to judge a voice by, or None when it is full-band."""
        share = self.high_band_share
        if share >= MIN_HIGH_BAND_SHARE:
            return None
        if self.source_rate < 2 * HIGH_BAND_HZ * 1.05:
            return f"sampled at {self.source_rate / 1000:g} kHz, nothing above {self.source_rate / 2000:g} kHz"
        return f"{100 * share:.2f}% of its energy above 4 kHz (full-band speech has about 1%)"


def load_clip(path: str | os.PathLike[str]) -> Clip:
    """Decode ``path`` with the project's reader (one-line errors for bad files), mix to mono, resample."""
    raw, rate = read_audio(path)
    mono = raw.mean(axis=1, dtype=np.float32) if raw.shape[1] > 1 else raw[:, 0]
    return clip_from_samples(str(path), mono, rate)


def clip_from_samples(name: str, samples: np.ndarray, rate: int) -> Clip:
    """A clip from mono samples at ``rate`` (decoded speech from the history, say)."""
    mono = np.ascontiguousarray(samples, dtype=np.float32)
    if rate != RATE:
        mono = soxr.resample(mono, rate, RATE, quality="HQ").astype(np.float32, copy=False)
    return Clip(name, mono, rate)


def join(name: str, clips: list[Clip]) -> Clip:
    """Several recordings of one speaker as one clip (the lowest source rate is kept)."""
    return Clip(name, np.concatenate([c.samples for c in clips]), min(c.source_rate for c in clips))
