"""An imperceptible keyed audio watermark for companion's 24 kHz speech.

Embedding adds a key-seeded pseudo-random noise block (band-limited to 1-4 kHz, repeating every
``BLOCK`` samples) scaled by the speech's own short-time level, about 30 dB below it: the mark is
masked by the speech and absent in silence. The level is a causal moving RMS of the input, so
``Watermarker.apply`` works chunk by chunk with a small carried state and gives the same samples as
marking the whole signal at once.

Detection needs no alignment: the band-passed, level-normalized audio is folded modulo ``BLOCK``
(summing every block on top of each other), then circularly cross-correlated with the key's block
by FFT. The mark piles up at one lag while speech does not; the score is that peak in units of the
correlation's spread over all lags (a z-score), so it does not depend on gain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import soxr

SAMPLE_RATE = 24000
BLOCK = 4096  # samples of the repeating mark (0.17 s at 24 kHz): the offset search covers all of them
BAND_HZ = (1000.0, 4000.0)  # the mark's band: survives 16 kHz resampling and MP3 coding
STRENGTH_DB = -30.0  # mark level relative to the speech's short-time RMS
WINDOW = 240  # samples of the causal moving RMS that shapes the mark (10 ms)
THRESHOLD = 7.0  # z-score above which a mark is reported (unmarked speech stays below ~5)
MIN_SECONDS = 1.0  # shorter clips are not judged
_FIXED = float(2**32)  # fixed-point scale of the squared samples summed by the moving RMS


@dataclass(frozen=True)
class Detection:
    score: float  # peak correlation in standard deviations of all lags
    detected: bool  # score >= threshold
    offset: int  # lag of the peak in the block (samples at 24 kHz)
    seconds: float  # audio examined
    threshold: float = THRESHOLD


def key_block(key: str) -> np.ndarray:
    """The key's mark block: (BLOCK,) float64, unit RMS, energy only in BAND_HZ."""
    seed = int.from_bytes(hashlib.sha256(f"companion-watermark:{key}".encode()).digest()[:8], "little")
    noise = np.random.default_rng(seed).standard_normal(BLOCK)
    spectrum = np.fft.rfft(noise) * _band_mask(BLOCK)
    block = np.fft.irfft(spectrum, BLOCK)
    return block / np.sqrt(np.mean(block**2))


def _band_mask(n: int) -> np.ndarray:
    """(n//2+1,) 1 inside BAND_HZ, 0 outside, for an rfft of length n at SAMPLE_RATE."""
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    return ((freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])).astype(np.float64)


class Watermarker:
    """Streaming embedder for one key. ``apply`` keeps the sample offset between calls.

    ``apply(a)`` then ``apply(b)`` returns the same samples as ``apply(concat(a, b))``.
    Call ``reset()`` before an unrelated signal (a new utterance), or keep going: both are detectable.
    """

    def __init__(self, key: str, strength_db: float = STRENGTH_DB) -> None:
        self._block = key_block(key)
        self._gain = 10.0 ** (strength_db / 20.0)
        self.reset()

    def reset(self) -> None:
        self.offset = 0  # samples marked since the last reset
        self._history = np.zeros(WINDOW - 1, dtype=np.int64)  # the last WINDOW-1 squares (fixed point)

    def mark(self, chunk: np.ndarray) -> np.ndarray:
        """The mark to add to ``chunk`` ((n,) 24 kHz); advances the offset."""
        x = np.asarray(chunk, dtype=np.float64).reshape(-1)
        n = x.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        # Squares in fixed point: integer sums are exact, so any chunking gives the same level.
        squares = np.concatenate([self._history, np.round(x * x * _FIXED).astype(np.int64)])
        sums = np.cumsum(np.concatenate([[0], squares]))
        level = np.sqrt((sums[WINDOW:] - sums[:-WINDOW]) / (WINDOW * _FIXED))  # (n,) causal RMS
        self._history = squares[-(WINDOW - 1) :]
        idx = (self.offset + np.arange(n)) % BLOCK
        self.offset += n
        return (self._gain * level * self._block[idx]).astype(np.float32)

    def apply(self, chunk: np.ndarray) -> np.ndarray:
        """``chunk`` with the mark added, float32, clipped to [-1, 1]."""
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        return np.clip(x + self.mark(x), -1.0, 1.0)


def embed(audio: np.ndarray, sample_rate: int, key: str, strength_db: float = STRENGTH_DB) -> np.ndarray:
    """Mark a whole signal at any sample rate: (n,) or (n, channels) -> same shape, float32.

    The mark is computed on a 24 kHz mono copy and resampled back, so the original rate and
    channels are kept (the same mark goes into every channel).
    """
    x = np.asarray(audio, dtype=np.float32)
    mono = x if x.ndim == 1 else x.mean(axis=1)
    at24 = mono if sample_rate == SAMPLE_RATE else soxr.resample(mono, sample_rate, SAMPLE_RATE)
    mark = Watermarker(key, strength_db).mark(at24)
    if sample_rate != SAMPLE_RATE:
        mark = _fit(soxr.resample(mark, SAMPLE_RATE, sample_rate), mono.shape[0])
    out = x + (mark if x.ndim == 1 else mark[:, None])
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad ``x`` to ``n`` samples."""
    return x[:n] if x.shape[0] >= n else np.pad(x, (0, n - x.shape[0]))


def detect(audio: np.ndarray, sample_rate: int, key: str) -> Detection:
    """Look for ``key``'s mark in ``audio`` ((n,) or (n, channels), any rate, any offset)."""
    x = np.asarray(audio, dtype=np.float64)
    mono = x if x.ndim == 1 else x.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE)
    seconds = mono.shape[0] / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        return Detection(0.0, False, 0, seconds)
    folded = _fold(_weigh(mono, _bandpass(mono)))
    corr = _circular_xcorr(folded, key_block(key))
    peak = int(np.argmax(np.abs(corr)))
    spread = 1.4826 * np.median(np.abs(corr - np.median(corr)))  # robust std over all lags
    score = float(abs(corr[peak]) / spread) if spread > 0 else 0.0
    return Detection(score, score >= THRESHOLD, peak, seconds)


def _bandpass(x: np.ndarray) -> np.ndarray:
    """Keep only BAND_HZ (one FFT over the whole clip, zero-padded to a fast length)."""
    n = x.shape[0]
    m = _fast_len(n + BLOCK)
    return np.fft.irfft(np.fft.rfft(x, m) * _band_mask(m), m)[:n]


def _fast_len(n: int) -> int:
    """The smallest 2^a * 3^b * 5^c >= n (lengths the FFT handles quickly)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _weigh(x: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Weigh the band-passed clip by where the mark should be strongest relative to the speech.

    The mark follows the broadband level while the interference is the in-band speech, so each
    sample is scaled by broadband RMS / in-band power (20 ms, centered; outliers capped).
    """
    band_power = np.maximum(_moving_power(band), 1e-3 * np.mean(band * band) + 1e-24)
    ratio = np.sqrt(_moving_power(x) / band_power)
    ratio = np.minimum(ratio, np.percentile(ratio, 99))
    return band / np.sqrt(band_power) * ratio


def _moving_power(x: np.ndarray) -> np.ndarray:
    """Mean square over a centered window of 2 * WINDOW samples: (n,) -> (n,)."""
    sums = np.cumsum(np.concatenate([np.zeros(WINDOW), x * x, np.zeros(WINDOW)]))
    return (sums[2 * WINDOW :] - sums[: -2 * WINDOW]) / (2 * WINDOW)


def _fold(x: np.ndarray) -> np.ndarray:
    """Sum the signal modulo BLOCK: (n,) -> (BLOCK,)."""
    pad = (-x.shape[0]) % BLOCK
    return np.pad(x, (0, pad)).reshape(-1, BLOCK).sum(axis=0)


def _circular_xcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """corr[k] = sum_n a[n + k] b[n] (indices mod BLOCK), whitened inside the band."""
    spec = np.fft.rfft(a) * np.conj(np.fft.rfft(b))
    mag = np.abs(spec)
    spec = np.where(mag > 0, spec / np.maximum(mag, 1e-12) ** 0.5, 0.0)  # half-way to PHAT
    return np.fft.irfft(spec, BLOCK)
