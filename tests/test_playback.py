"""Playback through a real PulseAudio null sink (started per test in a private dir), and the prebuffer rule.

What a listener hears is checked three ways (tests/pulse.py ``heard``): correlation > 0.99, level within
0.5 dB and length within one frame. Load tests play with every core busy, and with the player's process
stopped (SIGSTOP) for 300 ms while generation is ahead: no underrun, the same audio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from load import spinning, stall
from pulse import best_correlation, heard, pulse_server, pulseaudio_missing, speechlike, trim_silence

from companion.audio.playback import Player, Prebuffer, open_output, output_devices, resolve_device
from companion.errors import CompanionError

RATE = 24000
CHUNK = 1920  # one Mimi frame
ROOT = Path(__file__).resolve().parents[1]


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


def assert_heard(captured: np.ndarray, sent: np.ndarray) -> None:
    h = heard(captured, sent)
    print(h)
    assert h.ok(), h  # correlation > 0.99, level within 0.5 dB, length within one frame


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
def test_with_every_core_busy_playback_is_unchanged(pulse):
    """The load test: one spinning process per core beside the player (and the audio server)."""
    sent = speechlike(4.0, seed=4)
    player = Player().check()
    with spinning(seconds=60), pulse.capture() as cap:
        report = player.play(generated(sent, 0.016), expected_seconds=4.0)  # generation at 0.2x real time
    assert report.underruns == 0
    assert_heard(cap.audio(), sent)


def play_in_child(pulse, seconds: float, seed: int, rtf: float, stall_at: list[float], stall_s: float):
    """tests/play_child.py plays a reply with the real Player; its process is stopped at ``stall_at`` s."""
    env = dict(os.environ, PULSE_SERVER=pulse.server, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "play_child.py"), str(seconds), str(seed), str(rtf)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        play_at = json.loads(proc.stdout.readline())["play_at"]
        for at in stall_at:
            time.sleep(max(0.0, play_at + at - time.monotonic()))
            stall(proc.pid, stall_s)
        report = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
        return report
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.audio
def test_a_stalled_player_keeps_playing_what_it_handed_over(pulse):
    """Every core busy and the player's process stopped for 300 ms twice, generation seconds ahead by then.

    Audio that the player already handed to the audio server plays on while the process is stopped:
    no underrun, and the listener hears the reply unchanged.
    """
    sent = speechlike(6.0, seed=5)
    with spinning(seconds=60), pulse.capture() as cap:
        report = play_in_child(pulse, 6.0, 5, 0.2, stall_at=[2.0, 4.0], stall_s=0.3)
    print(report)
    assert report["underruns"] == 0 and not report["cancelled"]
    assert_heard(cap.audio(), sent)


@pytest.mark.audio
def test_a_stall_longer_than_the_device_buffer_is_counted(pulse):
    """The other side: stop the player for longer than the device holds (2 s): the gap is counted and heard."""
    sent = speechlike(6.0, seed=6)
    with pulse.capture() as cap:
        report = play_in_child(pulse, 6.0, 6, 0.2, stall_at=[2.0], stall_s=3.0)
    print(report)
    assert report["underruns"] >= 1 and report["total_underruns"] == report["underruns"]
    h = heard(cap.audio(), sent)
    print(h)
    assert h.length_diff > 0.5 * RATE  # the gap: heard for longer than the reply lasts


@pytest.mark.audio
def test_slow_generation_is_prebuffered_without_underruns(pulse):
    sent = speechlike(2.4, seed=1)
    player = Player().check()
    # 80 ms of audio every 110 ms: generation at 0.73x real time.
    with pulse.capture() as cap:
        report = player.play(generated(sent, 0.110), expected_seconds=2.4)
    print(f"started with {report.prebuffered_s:.2f} s buffered, underruns {report.underruns}")
    assert report.underruns == 0
    # it waited: 2.4 s at <= 0.73x needs at least 2.4 * (1 - 0.73 / 1.25) = 1.0 s buffered (a slower
    # machine only raises that)
    assert report.prebuffered_s is not None and report.prebuffered_s >= 1.0
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
def test_stop_silences_what_the_device_already_holds(pulse):
    """Stopped 1 s into a 6 s reply that was all generated at once (2 s of it handed to the device):
    the device's buffer is dropped too, so less than 1 + 2 s is heard (counted in samples, not timed)."""
    sent = speechlike(6.0, seed=3)
    player = Player().check()
    cancel = threading.Event()
    result = {}

    def play() -> None:
        result["report"] = player.play(generated(sent), cancel=cancel, expected_seconds=6.0)

    with pulse.capture() as cap:
        thread = threading.Thread(target=play)
        thread.start()
        time.sleep(1.0)
        cancel.set()
        player.stop()
        thread.join(30)
    assert not thread.is_alive() and result["report"].cancelled
    heard_s = len(trim_silence(cap.audio())) / RATE
    print(f"heard {heard_s:.2f} s of {len(sent) / RATE:.1f} s")
    assert 0.2 < heard_s < 2.5  # sound had started; without the drop it would be >= 3 s


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
