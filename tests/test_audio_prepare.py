"""Reference preparation on the real clips: mono float32 24 kHz at the loudness target; bad input refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from companion.audio.prepare import detect_speech, normalize_loudness, prepare_reference, prepare_references
from companion.config import ReferenceSettings
from companion.errors import CompanionError

GOOD = [
    "narrator.mp3",
    "narrator_48k.flac",
    "narrator_44k_stereo_30s.wav",
    "narrator_8k_u8.wav",
    "guest.mp3",
    "guest_16k.wav",
    "guest_22k.wav",
]
BAD = [
    ("empty.wav", "file is empty (0 bytes): record or export it again"),
    ("truncated.mp3", "file is truncated: its header declares 118.3 s but only 1.6 s can be decoded"),
    ("not_audio.wav", "not a readable audio file"),
    ("silence.wav", "contains only digital silence"),
    ("short.wav", "too little speech (0.0 s of speech in 0.2 s of audio), at least 1.0 s needed"),
    ("missing.wav", "file not found"),
]


def lufs(audio: np.ndarray) -> float:
    return float(pyloudnorm.Meter(24000).integrated_loudness(audio.astype(np.float64)))


@pytest.mark.parametrize("name", GOOD)
def test_good_clips_become_mono_24k_at_the_target(data_dir: Path, name: str) -> None:
    settings = ReferenceSettings(target_lufs=-26.0)  # every clip starts 1.6-6 LU away from it
    prepared = prepare_reference(data_dir / name, settings)
    audio = prepared.samples
    assert audio.dtype == np.float32 and audio.ndim == 1 and prepared.sample_rate == 24000
    assert abs(lufs(audio) - settings.target_lufs) < 1.0
    assert float(np.abs(audio).max()) <= 10 ** (settings.peak_dbfs / 20) + 1e-6
    report = prepared.reports[0]
    assert report.seconds_in == pytest.approx(sf.info(str(data_dir / name)).duration, abs=0.05)
    assert report.seconds_out == pytest.approx(len(audio) / 24000)
    assert 0.5 * report.seconds_in < report.seconds_out <= report.seconds_in
    assert report.lufs_in is not None and abs(report.lufs_out - lufs(audio)) < 0.01
    assert name in report.summary() and "LUFS" in report.summary()


@pytest.mark.parametrize(("name", "expected"), BAD)
def test_bad_clips_give_one_line_errors(data_dir: Path, name: str, expected: str) -> None:
    with pytest.raises(CompanionError) as err:
        prepare_reference(data_dir / name, ReferenceSettings())
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_a_directory_is_refused(data_dir: Path) -> None:
    with pytest.raises(CompanionError, match="is a directory"):
        prepare_reference(data_dir, ReferenceSettings())


@pytest.mark.parametrize(("name", "expected"), [BAD[1], BAD[3], BAD[4], ("not_audio.wav", "not a readable audio file")])
def test_bad_clips_through_the_cli(data_dir: Path, name: str, expected: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "companion", "voice", "add", "x", "--audio", str(data_dir / name), "--transcript", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and expected in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def _speech_with_pause(data_dir: Path, pause: float) -> tuple[np.ndarray, int]:
    """guest_16k.wav's first 4 s, `pause` s of silence, then its next 4 s, with 1 s of silence at both ends."""
    audio, sr = sf.read(str(data_dir / "guest_16k.wav"), dtype="float32")
    quiet = np.zeros(int(sr * pause), dtype=np.float32)
    edge = np.zeros(sr, dtype=np.float32)
    return np.concatenate([edge, audio[: 4 * sr], quiet, audio[4 * sr : 8 * sr], edge]), sr


def test_trims_edges_and_shortens_long_pauses(data_dir: Path, tmp_path: Path) -> None:
    audio, sr = _speech_with_pause(data_dir, pause=3.0)
    sf.write(str(tmp_path / "paused.wav"), audio, sr)
    trimmed = prepare_reference(tmp_path / "paused.wav", ReferenceSettings(max_pause_seconds=0.5)).reports[0]
    kept = prepare_reference(tmp_path / "paused.wav", ReferenceSettings(trim_silence=False)).reports[0]
    assert kept.seconds_out == pytest.approx(13.0, abs=0.01)
    # 13 s in: 2 s of edges and 2.5 s of the pause go (plus the pauses the speech itself has)
    assert trimmed.seconds_out < 13.0 - 4.0
    assert trimmed.seconds_out > trimmed.speech_seconds


def test_detect_speech_finds_the_spoken_parts(data_dir: Path) -> None:
    audio, sr = _speech_with_pause(data_dir, pause=3.0)
    import soxr

    segments = detect_speech(soxr.resample(audio, sr, 24000))
    assert segments[0][0] >= int(0.9 * 24000)  # nothing in the leading second of silence
    assert segments[-1][1] <= int(12.1 * 24000)
    assert not any(5.1 * 24000 < (a + b) / 2 < 7.9 * 24000 for a, b in segments)  # nothing in the pause


def test_peak_ceiling_holds_with_loudness_on_target() -> None:
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(24000 * 5)).astype(np.float32)
    audio[::4000] = 0.99  # sharp clicks far above the rest
    out, measured = normalize_loudness(audio, target_lufs=-16.0, peak_dbfs=-6.0)
    assert float(np.abs(out).max()) <= 10 ** (-6 / 20) + 1e-6
    assert abs(measured + 16.0) < 0.5 and abs(lufs(out) + 16.0) < 0.5


def test_several_files_are_joined_with_a_pause(data_dir: Path) -> None:
    settings = ReferenceSettings()
    one = prepare_reference(data_dir / "guest_16k.wav", settings)
    two = prepare_references([data_dir / "guest_16k.wav", data_dir / "guest_22k.wav"], settings)
    assert len(two.reports) == 2
    assert two.seconds == pytest.approx(one.seconds + two.reports[1].seconds_out + settings.max_pause_seconds, abs=0.01)


def test_min_speech_seconds_is_the_setting(data_dir: Path) -> None:
    with pytest.raises(CompanionError, match=r"at least 30.0 s needed"):
        prepare_reference(data_dir / "guest_16k.wav", ReferenceSettings(min_speech_seconds=30.0))
