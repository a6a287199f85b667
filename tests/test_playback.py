"""Playback through a real PulseAudio null sink (started per test in a private dir), and the prebuffer rule."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from pulse import best_correlation, pulse_server, pulseaudio_missing, trim_silence

from companion.audio.playback import Player, Prebuffer, open_output, output_devices, resolve_device
from companion.errors import CompanionError

RATE = 24000
CHUNK = 1920  # one Mimi frame


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp with a syllable-rate envelope and some noise: no lag of it looks like another."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * (180 * t + 60 * t**2)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * tone + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


def generated(audio: np.ndarray, seconds_per_chunk: float = 0.0) -> Iterator[np.ndarray]:
    """``audio`` in frame-sized chunks, each taking ``seconds_per_chunk`` to 'generate'."""
    for i in range(0, len(audio), CHUNK):
        time.sleep(seconds_per_chunk)
        yield audio[i : i + CHUNK]


def _reinit_portaudio() -> None:
    """PortAudio lists devices once, when it starts: restart it so it sees (or stops seeing) the server."""
    import sounddevice as sd

    sd._terminate()
    sd._initialize()


@pytest.fixture
def pulse(monkeypatch: pytest.MonkeyPatch):
    reason = pulseaudio_missing()
    if reason:
        pytest.skip(reason)
    with pulse_server() as server:
        monkeypatch.setenv("PULSE_SERVER", server.server)
        _reinit_portaudio()
        yield server
    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent/native")
    _reinit_portaudio()


def assert_heard(captured: np.ndarray, sent: np.ndarray) -> float:
    corr, _ = best_correlation(captured, sent)
    heard = trim_silence(captured)
    print(f"correlation {corr:.4f}, heard {len(heard) / RATE:.3f} s of {len(sent) / RATE:.3f} s")
    assert corr > 0.95
    assert abs(len(heard) - len(sent)) <= 0.05 * len(sent)
    return corr


# ---------------------------------------------------------------- the prebuffer rule (no device needed)


def test_prebuffer_faster_than_real_time_keeps_the_minimum():
    assert Prebuffer(minimum_s=0.2).threshold(expected_s=10.0, current_rate=3.0) == 0.2


def test_prebuffer_slower_than_real_time_buffers_what_the_rest_needs():
    # 10 s at half real time: starting with b >= 10 * (1 - 0.5 / 1.25) = 6 s never runs dry.
    assert Prebuffer(minimum_s=0.2, safety=1.25).threshold(10.0, 0.5) == pytest.approx(6.0)


def test_prebuffer_waits_for_a_measurement_and_remembers_the_last_speed():
    pb = Prebuffer(minimum_s=0.2)
    assert pb.threshold(5.0, None) == float("inf")  # nothing measured yet
    pb.observe(4.0)
    assert pb.threshold(5.0, None) == 0.2  # earlier replies were fast
    assert pb.threshold(5.0, 0.5) > 2.0  # but this one is slow: the slower speed wins
    assert Prebuffer(rate=0.5).threshold(None, 0.5) == float("inf")  # slow and unknown length: all of it


# ---------------------------------------------------------------- real playback


@pytest.mark.audio
def test_played_audio_reaches_the_sink_unchanged(pulse):
    assert any(d.is_default for d in output_devices())
    sent = speechlike(2.0)
    player = Player().check()
    with pulse.capture() as cap:
        report = player.play(generated(sent), expected_seconds=2.0)
    assert not report.cancelled and report.underruns == 0 and player.underruns == 0
    assert_heard(cap.audio(), sent)


@pytest.mark.audio
def test_slow_generation_is_prebuffered_without_underruns(pulse):
    sent = speechlike(2.4, seed=1)
    player = Player().check()
    # 80 ms of audio every 110 ms: generation at 0.73x real time.
    with pulse.capture() as cap:
        report = player.play(generated(sent, 0.110), expected_seconds=2.4)
    print(f"first sound after {report.first_sound_s:.2f} s, underruns {report.underruns}")
    assert report.underruns == 0
    assert report.first_sound_s is not None and report.first_sound_s > 0.5  # it did wait
    assert_heard(cap.audio(), sent)


@pytest.mark.audio
def test_without_the_prebuffer_slow_generation_underruns_and_is_counted(pulse):
    """The counter and the comparison can fail: start at once on slow generation and both see it."""
    sent = speechlike(2.4, seed=2)
    player = Player(prebuffer_ms=0).check()
    player.prebuffer.rate = 100.0  # believe generation is fast: the stream starts after two chunks
    player.prebuffer.safety = 1e-6
    with pulse.capture() as cap:
        report = player.play(generated(sent, 0.110), expected_seconds=2.4)
    corr, _ = best_correlation(cap.audio(), sent)
    print(f"underruns {report.underruns}, correlation {corr:.3f}")
    assert report.underruns > 0 and player.underruns == report.underruns
    assert corr < 0.95


@pytest.mark.audio
def test_stop_silences_playback_within_300_ms(pulse):
    sent = speechlike(6.0, seed=3)
    player = Player().check()
    cancel = threading.Event()
    result = {}

    def play() -> None:
        result["report"] = player.play(generated(sent), cancel=cancel, expected_seconds=6.0)
        result["returned"] = time.monotonic()

    with pulse.capture() as cap:
        thread = threading.Thread(target=play)
        thread.start()
        time.sleep(1.0)
        stopped_at = time.monotonic()
        cancel.set()
        player.stop()
        thread.join(5)
    elapsed = result["returned"] - stopped_at
    print(f"play() returned {elapsed * 1000:.0f} ms after stop()")
    assert result["report"].cancelled and elapsed < 0.3
    heard = trim_silence(cap.audio())
    assert 0.8 * RATE < len(heard) < 1.5 * RATE  # about the 1 s before the stop, not the 6 s


@pytest.mark.audio
def test_output_device_by_name_and_number(pulse):
    default = next(d for d in output_devices() if d.is_default)
    assert resolve_device(default.index) == default.index
    assert resolve_device(str(default.index)) == default.index
    with pytest.raises(CompanionError, match="run `companion devices`"):
        resolve_device("no-such-device")
    with pytest.raises(CompanionError, match="there is no output device 99"):
        resolve_device(99)


def test_no_server_falls_back_to_wav_files_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent/native")
    _reinit_portaudio()
    output, warning = open_output(None, tmp_path / "audio")
    assert warning is not None and "\n" not in warning and str(tmp_path / "audio") in warning
    report = output.play(generated(speechlike(1.0)))
    assert report.path is not None and report.path.parent == tmp_path / "audio"
    import soundfile

    info = soundfile.info(str(report.path))
    assert info.samplerate == RATE and abs(info.duration - 1.0) < 0.01
