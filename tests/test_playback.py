"""Playback: the prebuffer rule, the real Player against a stand-in device on a clock the test moves,
and the real Player through a real PulseAudio null sink (started per test in a private dir).

The stand-in tests pace generation by counts, never by sleeps: the test's clock moves only when its
generator "generates" a chunk, and the next chunk waits until the device was handed everything before
it. So the prebuffer, every underrun and every sample handed over are exact.

Through the null sink, what a listener hears is checked three ways (tests/pulse.py ``heard``): correlation
> 0.99, level within 0.5 dB and length within one frame. Load tests play with every core busy, and with
the player's process stopped (SIGSTOP) for 300 ms while generation is ahead: no underrun, the same audio.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from load import spinning, stall
from pulse import heard, pulse_server, pulseaudio_missing, speechlike, trim_silence

from companion.audio.playback import (
    UNDERRUN_SLACK_S,
    Player,
    Prebuffer,
    WavWriter,
    open_output,
    output_devices,
    resolve_device,
)
from companion.errors import CompanionError

RATE = 24000
CHUNK = 1920  # one Mimi frame
ROOT = Path(__file__).resolve().parents[1]


def generated(audio: np.ndarray) -> Iterator[np.ndarray]:
    """``audio`` in frame-sized chunks, all at once."""
    for i in range(0, len(audio), CHUNK):
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


# ---------------------------------------------------------------- the real Player, a stand-in device


class Clock:
    """Monotonic seconds that move only when the test's generator says so, or when the player waits on
    them (for the end to play out): a wait moves the clock to its end unless the event is already set.
    ``hold_waits``: a wait blocks (for real) until the event is set, as a stop while the end plays."""

    def __init__(self, hold_waits: bool = False) -> None:
        self.now = 100.0
        self.waits: list[float] = []  # the seconds of each wait, in order
        self.hold_waits = hold_waits
        self.waiting = threading.Event()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.waiting.set()
        if self.hold_waits:
            assert event.wait(60), "never stopped"
        if not event.is_set():
            self.now += seconds
        return event.is_set()


class Device:
    """A stand-in blocking output stream: keeps every sample it is handed; the writes numbered in
    ``underflow_at`` (1-based) report an underflow, as PortAudio does after a gap the clock did not see."""

    def __init__(self, underflow_at: set[int], hold_at: int | None = None) -> None:
        self.pieces: list[np.ndarray] = []
        self.handed = 0  # samples
        self.underflow_at = underflow_at
        self.hold_at = hold_at  # this write (1-based) blocks until ``release`` (a device whose buffer is full)
        self.held = threading.Event()
        self.released = threading.Event()
        self.closed = self.aborted = False
        self.stops = 0
        self.changed = threading.Condition()

    def write(self, data: np.ndarray) -> bool:
        if self.hold_at is not None and len(self.pieces) + 1 == self.hold_at:
            self.held.set()
            assert self.released.wait(60), "never released"
        with self.changed:
            self.pieces.append(np.array(data, copy=True))
            self.handed += len(data)
            self.changed.notify_all()
            return len(self.pieces) in self.underflow_at

    def wait_for(self, samples: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.handed >= samples, timeout=60), "the writer stopped"

    def audio(self) -> np.ndarray:
        return np.concatenate(self.pieces)

    def stop(self) -> None:  # what was written plays out
        self.stops += 1

    def abort(self) -> None:  # dropped at once
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class StandInPlayer(Player):
    """The real Player (prebuffer, writer thread, underrun count) on ``Clock``, playing into ``Device``."""

    def __init__(self, underflow_at: set[int] | None = None, hold_at: int | None = None, clock: Clock | None = None,
                 **kw: Any) -> None:  # fmt: skip
        clock = clock or Clock()
        super().__init__(clock=clock, wait=clock.wait, **kw)
        self.underflow_at = underflow_at or set()
        self.hold_at = hold_at
        self.devices: list[Device] = []

    def open_stream(self) -> Device:
        self.devices.append(Device(self.underflow_at, self.hold_at))
        return self.devices[-1]


def paced(player: StandInPlayer, audio: np.ndarray, seconds_per_chunk: float,
          stalls: dict[int, float] | None = None, chunk_size: int = CHUNK) -> Iterator[np.ndarray]:
    """``audio`` in chunks, chunk i 'generated' ``seconds_per_chunk`` (plus ``stalls[i]``) after the one before
    it on the player's clock. Once playback has started, a chunk is generated only after the device was
    handed everything before it: the writer is never behind, so the clock alone decides what is late."""
    stalls = stalls or {}
    opened, sent = len(player.devices), 0
    for i, start in enumerate(range(0, len(audio), chunk_size)):
        player.clock.advance(seconds_per_chunk + stalls.get(i, 0.0))  # type: ignore[attr-defined]
        chunk = audio[start : start + chunk_size]
        yield chunk
        sent += len(chunk)
        if len(player.devices) > opened:
            player.devices[-1].wait_for(sent)


def tail(player: Player) -> np.ndarray:
    return np.zeros(len(player.tail), np.float32)


# Fast generation (0.04 s per 80 ms chunk, 2x real time): the rate is known at the second chunk and
# playback starts at the third (0.24 s >= the 0.2 s minimum). From then on chunk k is handed over at
# 0.04 (k + 1) s and is due at 0.12 + 0.08 k (+ 0.04 s slack): a stall before chunk 8 is an underrun
# when it is longer than 0.44 s, what the device still holds then.


def test_fast_generation_starts_at_the_minimum_and_hands_over_every_sample() -> None:
    player = StandInPlayer()
    sent = speechlike(1.2, seed=7)
    report = player.play(paced(player, sent, 0.04), expected_seconds=1.2)
    assert report.prebuffered_s == pytest.approx(0.24) and report.first_sound_s == pytest.approx(0.12)
    assert report.underruns == 0 and player.underruns == 0 and not report.cancelled
    assert report.seconds == pytest.approx(1.2)
    (device,) = player.devices
    np.testing.assert_array_equal(device.audio(), np.concatenate([sent, tail(player)]))
    assert {len(p) for p in device.pieces} == {player.piece} and device.closed
    assert device.stops == 1 and not device.aborted  # played out, not dropped


def test_a_stall_within_what_the_device_holds_is_no_underrun() -> None:
    player = StandInPlayer()
    report = player.play(paced(player, speechlike(1.2), 0.04, stalls={8: 0.3}), expected_seconds=1.2)
    assert report.underruns == 0


def test_each_stall_longer_than_what_the_device_holds_is_one_underrun() -> None:
    player = StandInPlayer()
    sent = speechlike(1.2, seed=8)
    report = player.play(paced(player, sent, 0.04, stalls={8: 1.0}), expected_seconds=1.2)
    assert report.underruns == 1 and player.underruns == 1
    player.prebuffer.rate = None  # (the stall slowed the remembered speed: start this reply as the first)
    report = player.play(paced(player, sent, 0.04, stalls={5: 1.0, 10: 2.0}), expected_seconds=1.2)
    assert report.underruns == 2
    np.testing.assert_array_equal(player.devices[-1].audio(), np.concatenate([sent, tail(player)]))


def test_the_players_underrun_count_adds_up_over_replies() -> None:
    player = StandInPlayer()
    counts = []
    for stalls in ({8: 1.0}, {}, {4: 1.0, 9: 1.0}, {6: 1.0}):
        player.prebuffer.rate = None  # each reply starts as the first (a stall slows the remembered speed)
        counts.append(player.play(paced(player, speechlike(1.2), 0.04, stalls=stalls)).underruns)
        assert player.underruns == sum(counts)
    assert counts == [1, 0, 2, 1] and player.underruns == 4


def test_a_gap_the_device_reports_is_one_underrun_however_many_writes_report_it() -> None:
    # 1.2 s in 20 ms writes: 60 of the reply, then the tail's 5. Writes 20-23 follow one gap, 40 another.
    player = StandInPlayer(underflow_at={20, 21, 22, 23, 40})
    report = player.play(paced(player, speechlike(1.2), 0.04), expected_seconds=1.2)
    assert report.underruns == 2
    # a gap the clock sees and the device reports on the same write is still one
    player = StandInPlayer(underflow_at={33, 34})  # chunk 8 (after the stall) starts at write 33
    report = player.play(paced(player, speechlike(1.2), 0.04, stalls={8: 1.0}), expected_seconds=1.2)
    assert report.underruns == 1
    # a gap reported at the very first write counts too
    player = StandInPlayer(underflow_at={1})
    assert player.play(paced(player, speechlike(1.2), 0.04), expected_seconds=1.2).underruns == 1


def test_a_piece_exactly_at_the_end_of_the_slack_is_on_time_one_tick_later_is_late() -> None:
    """16 kHz in chunks of 1000 samples (1/16 s) generated every 1/32 s: playback starts at chunk 4
    (0.25 s >= 0.2 s), at 100.125 s, so chunk 8 is due at 100.625 s. Handed over at exactly that plus
    the slack it is on time; at the next instant the clock can tell, it follows a gap."""
    for late, underruns in ((False, 0), (True, 1)):
        player = StandInPlayer(sample_rate=16000)

        def generation(player: StandInPlayer = player, late: bool = late) -> Iterator[np.ndarray]:
            for i, chunk in enumerate(paced(player, speechlike(1.0)[:16000], 1 / 32, chunk_size=1000)):
                if i == 8:
                    limit = (100.125 + 8000 / 16000) + UNDERRUN_SLACK_S  # the player's own arithmetic
                    player.clock.now = float(np.nextafter(limit, np.inf)) if late else limit  # type: ignore[attr-defined]
                yield chunk

        report = player.play(generation(), expected_seconds=1.0)
        assert report.first_sound_s == 0.125 and report.underruns == underruns


def test_slow_generation_is_prebuffered_by_the_rule_without_underruns() -> None:
    """80 ms of audio every 110 ms (0.73x real time): 2.4 s needs 2.4 * (1 - 0.727 / 1.25) = 1.004 s
    buffered, i.e. 13 chunks (1.04 s); from there the device never runs dry."""
    player = StandInPlayer()
    sent = speechlike(2.4, seed=1)
    report = player.play(paced(player, sent, 0.11), expected_seconds=2.4)
    assert report.prebuffered_s == pytest.approx(13 * 0.08) and report.underruns == 0
    assert report.first_sound_s == pytest.approx(13 * 0.11)
    np.testing.assert_array_equal(player.devices[-1].audio(), np.concatenate([sent, tail(player)]))


def test_without_the_prebuffer_slow_generation_underruns_and_each_gap_is_counted() -> None:
    """The same generation started at once: each chunk comes 30 ms later than the last one ends, so every
    second chunk is past the 40 ms slack: chunks 2, 4, ... 28 of 30 each follow a gap (14)."""
    player = StandInPlayer(prebuffer_ms=0)
    player.prebuffer.rate = 100.0  # believe generation is fast: the stream starts at the first chunk
    report = player.play(paced(player, speechlike(2.4, seed=2), 0.11), expected_seconds=2.4)
    assert report.prebuffered_s == pytest.approx(0.08)
    assert report.underruns == 14 and player.underruns == 14


def test_the_remembered_speed_is_the_mean_of_the_last_one_and_the_new_one() -> None:
    pb = Prebuffer()
    pb.observe(4.0)
    assert pb.rate == 4.0
    pb.observe(2.0)
    assert pb.rate == 3.0
    pb.observe(1.0)
    assert pb.rate == 2.0


def test_a_reply_sets_the_remembered_speed_from_its_own_generation() -> None:
    player = StandInPlayer()
    player.play(paced(player, speechlike(1.2), 0.04), expected_seconds=1.2)  # 1.2 s of audio in 0.6 s
    assert player.prebuffer.rate == pytest.approx(1.2 / (15 * 0.04 - 0.04))  # from the first chunk on
    player.play(paced(player, speechlike(1.2), 0.08), expected_seconds=1.2)  # then at real time
    assert player.prebuffer.rate == pytest.approx(0.5 * 1.2 / 0.56 + 0.5 * 1.2 / (15 * 0.08 - 0.08))


def stopped_while_held(player: StandInPlayer) -> tuple[Any, Device]:
    """Play 1.2 s on another thread; once the device blocks at its held write, stop() and release it."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(report=player.play(generated(speechlike(1.2)))))
    thread.start()
    for _ in range(6000):  # until the stream is open: counted, not timed
        if player.devices:
            break
        threading.Event().wait(0.005)
    device = player.devices[0]
    assert device.held.wait(60)
    player.stop()
    device.released.set()
    thread.join(60)
    return result["report"], device


@pytest.mark.parametrize("hold_at", [10, 12])  # inside a chunk of four writes, and its last write
def test_stop_from_another_thread_drops_what_the_device_holds(hold_at: int) -> None:
    """The device blocks at a write (its buffer is full); stop() meanwhile: that write is the last one."""
    player = StandInPlayer(hold_at=hold_at)
    report, device = stopped_while_held(player)
    assert report.cancelled and device.aborted and device.stops == 0
    assert len(device.pieces) == hold_at and device.closed
    assert player.clock.waits == []  # type: ignore[attr-defined]  # a stopped reply does not wait for its end


def test_a_cancel_while_the_end_plays_drops_it() -> None:
    """Generation is over (the whole reply is in the player); the cancel comes while the device is full."""
    player = StandInPlayer(hold_at=40)  # of 60 + 5 writes
    cancel = threading.Event()

    def cancelled_when_held() -> None:
        while not player.devices:
            threading.Event().wait(0.005)
        assert player.devices[0].held.wait(60)
        cancel.set()
        for _ in range(6000):  # until play() has seen it (it halts the writer), counted, not timed
            if player._feed is None or player._feed.halted:
                break
            threading.Event().wait(0.005)
        player.devices[0].released.set()

    helper = threading.Thread(target=cancelled_when_held)
    helper.start()
    report = player.play(generated(speechlike(1.2)), cancel=cancel, expected_seconds=1.2)
    helper.join(60)
    device = player.devices[0]
    assert report.cancelled and report.seconds == pytest.approx(1.2)
    assert device.aborted and device.stops == 0 and len(device.pieces) == 40
    assert player.clock.waits == []  # type: ignore[attr-defined]  # nor does one cancelled while its end plays


def test_the_end_plays_out_by_the_clock_then_the_device_finishes() -> None:
    """1.2 s at 24 kHz in chunks of 1000 samples (not whole 20 ms writes), one every 0.02 s: playback
    starts at chunk 5 (0.208 s >= 0.2 s), at 100.1 s; the 1.3 s handed over (reply and tail) play until
    101.4 s. Generation ends at 100.58 s: the writer waits the 0.82 s left, then lets the device finish."""
    player = StandInPlayer()
    sent = speechlike(1.2, seed=14)
    report = player.play(paced(player, sent, 0.02, chunk_size=1000), expected_seconds=1.2)
    assert report.first_sound_s == pytest.approx(0.1) and report.underruns == 0
    assert player.clock.waits == [pytest.approx(0.82)]  # type: ignore[attr-defined]
    (device,) = player.devices
    assert device.stops == 1 and not device.aborted and device.closed
    np.testing.assert_array_equal(device.audio(), np.concatenate([sent, tail(player)]))


def test_a_stop_while_the_end_plays_out_drops_it() -> None:
    """Everything was handed over and the writer waits for it to play: stop() ends the wait at once and
    drops what the device holds."""
    player = StandInPlayer(clock=Clock(hold_waits=True))
    sent = speechlike(1.2, seed=15)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(report=player.play(generated(sent), expected_seconds=1.2)))
    thread.start()
    assert player.clock.waiting.wait(60)  # type: ignore[attr-defined]
    player.stop()
    thread.join(60)
    (device,) = player.devices
    assert result["report"].cancelled and device.aborted and device.stops == 0 and device.closed
    np.testing.assert_array_equal(device.audio(), np.concatenate([sent, tail(player)]))


class UnabortableDevice(Device):
    """A device whose abort fails (the audio server gone while a reply plays)."""

    def abort(self) -> None:
        self.aborted = True
        raise OSError("the audio server went away")


def test_a_device_that_cannot_abort_still_stops_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    player = StandInPlayer(hold_at=12)
    player.open_stream = lambda: player.devices.append(UnabortableDevice(set(), 12)) or player.devices[-1]  # type: ignore[method-assign]
    report, device = stopped_while_held(player)
    assert report.cancelled and device.aborted and device.closed and escaped == []


def test_a_cancel_inside_a_reply_stops_handing_audio_over() -> None:
    player = StandInPlayer()
    cancel = threading.Event()
    sent = speechlike(1.2, seed=9)

    def cancelled_at_chunk_6() -> Iterator[np.ndarray]:
        for i, chunk in enumerate(paced(player, sent, 0.04)):
            if i == 6:
                cancel.set()
            yield chunk

    report = player.play(cancelled_at_chunk_6(), cancel=cancel, expected_seconds=1.2)
    assert report.cancelled and report.seconds == pytest.approx(6 * 0.08)
    np.testing.assert_array_equal(player.devices[-1].audio(), sent[: 6 * CHUNK])  # no tail after a cancel


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


class Counted:
    """A real output stream that counts the samples handed to it (for pacing and stopping by counts)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.handed = 0
        self.changed = threading.Condition()

    def write(self, data: np.ndarray) -> bool:
        underflowed = bool(self.stream.write(data))
        with self.changed:
            self.handed += len(data)
            self.changed.notify_all()
        return underflowed

    def wait_for(self, samples: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.handed >= samples, timeout=60), "the writer stopped"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class CountingPlayer(Player):
    """The real Player on the real device, its stream counted."""

    counted: Counted | None = None

    def open_stream(self) -> Counted:
        self.counted = Counted(super().open_stream())
        return self.counted


def interleaved(player: CountingPlayer, audio: np.ndarray, ahead: int) -> Iterator[np.ndarray]:
    """``audio`` in chunks; once playback has started, chunk i waits until chunk i - ``ahead`` was handed over."""
    for i, start in enumerate(range(0, len(audio), CHUNK)):
        if player.counted is not None:
            player.counted.wait_for(min(len(audio), max(0, i - ahead) * CHUNK))
        yield audio[start : start + CHUNK]


@pytest.mark.audio
def test_with_every_core_busy_playback_is_unchanged(pulse):
    """The load test: one spinning process per core beside the player (and the audio server), generation
    interleaved with the writer thread (at most 8 chunks ahead of what the device was handed)."""
    sent = speechlike(4.0, seed=4)
    player = CountingPlayer().check()
    with spinning(seconds=60), pulse.capture() as cap:
        report = player.play(interleaved(player, sent, ahead=8), expected_seconds=4.0)
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
    """Every core busy and the player's process stopped for 300 ms twice, the whole reply generated first.

    Audio that the player already handed to the audio server plays on while the process is stopped:
    no underrun, and the listener hears the reply unchanged. The reply is there at once (rtf 0), so the
    device buffer is full (2 s) from the start and each stall leaves 1.7 s of margin: a busy machine
    starving the child at the start, when a generator just ahead of playback leaves only the prebuffer,
    cannot count a gap that the stalls did not make.
    """
    sent = speechlike(6.0, seed=5)
    with spinning(seconds=60), pulse.capture() as cap:
        report = play_in_child(pulse, 6.0, 5, 0.0, stall_at=[2.0, 4.0], stall_s=0.3)
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
def test_stop_silences_what_the_device_already_holds(pulse):
    """A 6 s reply generated at once, stopped once 3 s of it were handed to the device (which holds 2 s,
    so at least 1 s has played): the device's buffer is dropped too, so less than the 3 s is heard."""
    sent = speechlike(6.0, seed=3)
    player = CountingPlayer().check()
    cancel = threading.Event()
    result = {}

    def play() -> None:
        result["report"] = player.play(generated(sent), cancel=cancel, expected_seconds=6.0)

    with pulse.capture() as cap:
        thread = threading.Thread(target=play)
        thread.start()
        for _ in range(6000):  # until the stream is open (the prebuffer is there), counted, not timed
            if player.counted is not None:
                break
            threading.Event().wait(0.005)
        assert player.counted is not None
        player.counted.wait_for(3 * RATE)
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


# ---------------------------------------------------------------- the WAV fallback (no device needed)


def test_each_reply_becomes_its_own_numbered_wav_file_with_exactly_its_samples(tmp_path: Path) -> None:
    import soundfile

    writer = WavWriter(tmp_path, sample_rate=16000)
    assert writer.underruns == 0 and writer.describe() == f"WAV files: {tmp_path}"
    first, second = speechlike(0.5, seed=1), speechlike(0.25, seed=2)
    a = writer.play(generated(first))
    b = writer.play(generated(second))
    assert a.path is not None and b.path is not None
    assert re.fullmatch(r"reply-\d{8}-\d{6}-001\.wav", a.path.name) and b.path.name.endswith("-002.wav")
    assert (a.seconds, a.underruns, a.cancelled) == (len(first) / 16000, 0, False)
    for report, sent in ((a, first), (b, second)):
        audio, rate = soundfile.read(str(report.path), dtype="float32")
        assert rate == 16000 and len(audio) == len(sent)
        np.testing.assert_allclose(audio, sent, atol=1 / 32767)  # 16-bit PCM
    assert writer.underruns == 0


def test_a_cancelled_or_empty_reply_writes_no_file(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "audio")
    cancel = threading.Event()

    def cancelled_at_chunk_3() -> Iterator[np.ndarray]:
        for i, chunk in enumerate(generated(speechlike(1.0))):
            if i == 3:
                cancel.set()
            yield chunk

    report = writer.play(cancelled_at_chunk_3(), cancel=cancel)
    assert report.cancelled and report.path is None and report.seconds == 3 * CHUNK / RATE
    report = writer.play(iter([]))
    assert not report.cancelled and report.path is None and report.seconds == 0
    assert not (tmp_path / "audio").exists()
    (tmp_path / "audio").mkdir()
    report = writer.play(generated(speechlike(0.2)))  # the numbering counts files written, not replies
    assert report.path is not None and report.path.name.endswith("-001.wav")


def test_without_a_device_the_fallback_keeps_the_sample_rate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent/native")
    _reinit_portaudio()
    output, warning = open_output(None, tmp_path, sample_rate=16000)
    assert isinstance(output, WavWriter) and output.sample_rate == 16000 and output.directory == tmp_path
    assert warning == f"no audio output ({warning.split('(', 1)[1].split(')')[0]}); replies are written as WAV files to {tmp_path}"


# ---------------------------------------------------------------- shapes, short replies, defaults


def test_a_reply_shorter_than_the_prebuffer_is_played_whole() -> None:
    player = StandInPlayer()
    sent = speechlike(0.1, seed=3)  # less than the 0.2 s minimum: playback starts once generation ends
    report = player.play(paced(player, sent, 0.04), expected_seconds=0.1)
    (device,) = player.devices
    np.testing.assert_array_equal(device.audio(), np.concatenate([sent, tail(player)]))
    assert report.prebuffered_s == pytest.approx(0.1) and report.seconds == pytest.approx(0.1)


def test_an_empty_reply_opens_no_stream() -> None:
    player = StandInPlayer()
    report = player.play(iter([]), expected_seconds=1.0)
    assert player.devices == [] and report.seconds == 0 and report.first_sound_s is None and not report.cancelled


def test_chunks_of_any_shape_and_float_type_play_as_float32_samples(tmp_path: Path) -> None:
    sent = speechlike(0.4, seed=4)
    column = [c.astype(np.float64).reshape(-1, 1) for c in generated(sent)]  # (n, 1) float64 chunks
    player = StandInPlayer()
    player.play(iter(column), expected_seconds=0.4)
    device = player.devices[0]
    assert {p.dtype for p in device.pieces} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(device.audio(), np.concatenate([sent, tail(player)]))
    report = WavWriter(tmp_path / "nested" / "audio").play(iter(column))  # folders made as needed
    import soundfile

    audio, _ = soundfile.read(str(report.path), dtype="float32")
    np.testing.assert_allclose(audio, sent, atol=1 / 32767)
    assert (report.underruns, report.cancelled) == (0, False)


def test_the_default_player_buffers_200_ms_and_ends_with_100_ms_of_silence() -> None:
    player = StandInPlayer()
    assert player.tail.dtype == np.float32 and len(player.tail) == 2400  # 100 ms at 24 kHz
    assert player.prebuffer.minimum_s == 0.2
    sent = speechlike(1.0, seed=5)
    report = player.play(paced(player, sent, 0.01), expected_seconds=1.0)  # 8x real time
    assert report.prebuffered_s == pytest.approx(0.24)  # the first chunk boundary at or past 0.2 s
    assert np.count_nonzero(player.devices[0].audio()[len(sent):]) == 0


def test_the_generation_speed_is_measured_from_the_second_chunk() -> None:
    """Two chunks are enough to know the speed: a 0.16 s reply at 2x real time starts before it ends."""
    player = StandInPlayer(prebuffer_ms=40)
    sent = speechlike(0.24, seed=6)
    report = player.play(paced(player, sent, 0.04), expected_seconds=0.24)
    assert report.prebuffered_s == pytest.approx(0.16)


def test_a_speed_exactly_at_the_safety_margin_starts_at_the_minimum() -> None:
    assert Prebuffer(minimum_s=0.2, safety=1.25).threshold(10.0, 1.25) == 0.2
    assert Prebuffer(minimum_s=0.2, safety=1.25).threshold(10.0, 1.2) > 0.2


def test_the_writer_is_a_named_daemon_thread() -> None:
    player = StandInPlayer(hold_at=2)
    sent = speechlike(1.2, seed=9)
    done = threading.Thread(target=player.play, args=(generated(sent),), kwargs={"expected_seconds": 1.2})
    done.start()
    wait = time.monotonic() + 60
    while not player.devices or not player.devices[0].held.is_set():
        assert time.monotonic() < wait
        time.sleep(0.002)
    (writer,) = [t for t in threading.enumerate() if t.name == "companion-audio-writer"]
    assert writer.daemon  # a device that never returns cannot keep the program from exiting
    player.devices[0].released.set()
    done.join(60)


class FailingDevice(Device):
    """Fails at its third write, as a device unplugged while a reply plays."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.failed = threading.Event()

    def write(self, data: np.ndarray) -> bool:
        if len(self.pieces) == 2:
            self.failed.set()
            raise OSError("the device went away")
        return super().write(data)


class FailingPlayer(StandInPlayer):
    def open_stream(self) -> Device:
        self.devices.append(FailingDevice(self.underflow_at, self.hold_at))
        return self.devices[-1]


def test_a_device_that_fails_while_the_reply_is_generated_raises_its_error() -> None:
    player = FailingPlayer()

    def generating() -> Iterator[np.ndarray]:
        for i, chunk in enumerate(generated(speechlike(2.0, seed=11))):
            player.clock.advance(0.01)  # type: ignore[attr-defined]
            if player.devices and i == 6:  # playing: wait until the writer has failed and ended
                assert player.devices[0].failed.wait(60)
                for t in [t for t in threading.enumerate() if t.name == "companion-audio-writer"]:
                    t.join(60)
            yield chunk

    with pytest.raises(OSError, match="^the device went away$"):
        player.play(generating(), expected_seconds=2.0)
    assert player.devices[0].aborted and player.devices[0].closed


def test_a_device_error_while_playing_is_said_in_the_users_words() -> None:
    """PortAudio's own error from a write (the device unplugged, the server gone) comes out of play() as
    the product's one-line error, with PortAudio's reason."""
    import sounddevice as sd

    class GoneDevice(Device):
        def write(self, data: np.ndarray) -> bool:
            raise sd.PortAudioError("Unanticipated host error", -9999)

    class GonePlayer(StandInPlayer):
        def open_stream(self) -> Device:
            self.devices.append(GoneDevice(set()))
            return self.devices[-1]

    player = GonePlayer()
    with pytest.raises(CompanionError) as err:
        player.play(generated(speechlike(0.4)), expected_seconds=0.4)
    assert str(err.value) == "the audio output failed (Unanticipated host error [PaErrorCode -9999])"
    assert isinstance(err.value.__cause__, sd.PortAudioError)


def test_a_wav_reply_that_is_cancelled_or_empty_reports_no_underrun(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    writer = WavWriter(tmp_path)
    for report in (writer.play(generated(speechlike(0.2)), cancel=cancel), writer.play(iter([]))):
        assert report.underruns == 0 and report.path is None


def test_playback_starts_at_the_chunk_that_reaches_the_prebuffer_exactly() -> None:
    player = StandInPlayer(prebuffer_ms=160)
    report = player.play(paced(player, speechlike(0.8, seed=12), 0.04), expected_seconds=0.8)
    assert report.prebuffered_s == pytest.approx(0.16)  # two chunks: 0.16 s, exactly the minimum


def test_stop_with_nothing_playing_is_harmless_before_and_after_a_reply() -> None:
    player = StandInPlayer()
    player.stop()  # Ctrl-C at the prompt: nothing is playing
    report = player.play(paced(player, speechlike(0.4, seed=13), 0.04), expected_seconds=0.4)
    player.stop()
    assert not report.cancelled and report.prebuffered_s is not None
    assert player.play(iter([])).prebuffered_s is None  # nothing generated: never started
