"""The watermark on real speech: streaming equals one-shot, detection survives crops, resampling, MP3, gain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from companion import watermark
from companion.watermark import SAMPLE_RATE, Watermarker, detect, embed

KEY = "test-key"


def _speech_24k(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE).astype(np.float32)


@pytest.fixture(scope="module")
def guest(data_dir: Path) -> np.ndarray:
    return _speech_24k(data_dir / "guest_16k.wav")


@pytest.fixture(scope="module")
def narrator(data_dir: Path) -> np.ndarray:
    return _speech_24k(data_dir / "narrator_44k_stereo_30s.wav")


@pytest.fixture(scope="module")
def marked(guest: np.ndarray) -> np.ndarray:
    return Watermarker(KEY).apply(guest)


def _snr_db(clean: np.ndarray, marked: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum((marked - clean).astype(np.float64) ** 2)))


def test_chunked_apply_equals_whole(guest: np.ndarray) -> None:
    whole = Watermarker(KEY).apply(guest)
    wm = Watermarker(KEY)
    rng = np.random.default_rng(0)
    pieces, start = [], 0
    while start < guest.shape[0]:
        size = int(rng.integers(1, 5000))
        pieces.append(wm.apply(guest[start : start + size]))
        start += size
    assert np.array_equal(np.concatenate(pieces), whole)
    assert wm.offset == guest.shape[0]


def test_reset_starts_over(guest: np.ndarray) -> None:
    wm = Watermarker(KEY)
    first = wm.apply(guest[:24000])
    wm.apply(guest[24000:50000])
    wm.reset()
    assert wm.offset == 0
    assert np.array_equal(wm.apply(guest[:24000]), first)


def test_mark_is_quiet_and_silent_in_silence(guest: np.ndarray, marked: np.ndarray) -> None:
    snr = _snr_db(guest, marked)
    assert 28.0 < snr < 32.0, snr
    silence = np.zeros(24000, dtype=np.float32)
    assert np.array_equal(Watermarker(KEY).apply(silence), silence)
    assert marked.dtype == np.float32 and np.abs(marked).max() <= 1.0


def test_mark_stays_in_its_band(guest: np.ndarray, marked: np.ndarray) -> None:
    mark = (marked - guest).astype(np.float64)
    power = np.abs(np.fft.rfft(mark)) ** 2
    freqs = np.fft.rfftfreq(mark.shape[0], 1 / SAMPLE_RATE)
    inside = power[(freqs >= 900) & (freqs <= 4100)].sum()
    assert inside / power.sum() > 0.95  # the level shaping spreads a little energy outside


def test_detects_the_whole_marked_clip(marked: np.ndarray) -> None:
    result = detect(marked, SAMPLE_RATE, KEY)
    assert result.detected and result.score > 25.0, result


def test_no_false_positive_on_unmarked_speech(data_dir: Path, guest: np.ndarray, narrator: np.ndarray) -> None:
    scores = [detect(clip, SAMPLE_RATE, key).score for clip in (guest, narrator) for key in (KEY, "companion", "x")]
    audio, rate = sf.read(data_dir / "narrator_8k_u8.wav", dtype="float32")
    scores.append(detect(audio, rate, KEY).score)
    assert max(scores) < watermark.THRESHOLD - 1.5, scores


def test_wrong_key_is_not_detected(marked: np.ndarray) -> None:
    for key in ("companion", "test-key2", "Test-key"):
        result = detect(marked, SAMPLE_RATE, key)
        assert not result.detected and result.score < 5.5, (key, result)


@pytest.mark.parametrize("start", [0, 12345, 100_001, 300_000])
def test_cropped_3s_at_any_offset(marked: np.ndarray, start: int) -> None:
    result = detect(marked[start : start + 3 * SAMPLE_RATE], SAMPLE_RATE, KEY)
    assert result.detected and result.score > 12.0, result


@pytest.mark.parametrize("rate", [16000, 48000])
def test_after_resampling(marked: np.ndarray, rate: int) -> None:
    resampled = soxr.resample(marked, SAMPLE_RATE, rate)
    result = detect(resampled[rate : rate * 6], rate, KEY)  # 5 s from 1 s in
    assert result.detected and result.score > 15.0, result


def test_after_mp3_round_trip(marked: np.ndarray) -> None:
    buf = io.BytesIO()
    sf.write(buf, marked, SAMPLE_RATE, format="MP3", bitrate_mode="CONSTANT", compression_level=0.8)  # ~40 kbit/s
    buf.seek(0)
    decoded, rate = sf.read(buf, dtype="float32")
    whole = detect(decoded, rate, KEY)
    cropped = detect(decoded[50_000 : 50_000 + 3 * rate], rate, KEY)
    assert whole.detected and whole.score > 25.0, whole
    assert cropped.detected and cropped.score > 10.0, cropped


@pytest.mark.parametrize("gain", [0.25, 0.5, 1.6])
def test_after_gain_change(marked: np.ndarray, gain: float) -> None:
    changed = np.clip(marked * gain, -1.0, 1.0)
    result = detect(changed, SAMPLE_RATE, KEY)
    assert result.detected and result.score > 25.0, result


def test_embed_keeps_rate_and_channels(data_dir: Path) -> None:
    audio, rate = sf.read(data_dir / "narrator_44k_stereo_30s.wav", dtype="float32")
    out = embed(audio, rate, KEY)
    assert out.shape == audio.shape and out.dtype == np.float32
    assert 28.0 < _snr_db(audio[:, 0], out[:, 0]) < 32.0
    assert detect(out, rate, KEY).detected
    assert not detect(audio, rate, KEY).detected


def test_too_short_is_not_judged(marked: np.ndarray) -> None:
    result = detect(marked[: SAMPLE_RATE // 2], SAMPLE_RATE, KEY)
    assert not result.detected and result.score == 0.0 and result.seconds == pytest.approx(0.5)


def test_keys_give_different_blocks() -> None:
    a, b = watermark.key_block("a"), watermark.key_block("b")
    assert np.array_equal(a, watermark.key_block("a"))
    assert abs(float(np.dot(a, b))) / a.shape[0] < 0.1
    assert np.mean(a**2) == pytest.approx(1.0)
