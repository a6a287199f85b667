"""Talking back (companion/talkback.py) with a recording stand-in for the session and a writer the test
paces: what is shown, spoken and recorded when the reply ends, fails, is cut or is cleared, and the
timings it reports. The same flows against the tiny model and a real OpenAI-compatible server are in
tests/test_talkback.py; these run in milliseconds and reach the corners those cannot pace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from companion.errors import CompanionError
from companion.session.dialogue import Dialogue
from companion.store import Exchange
from companion.talkback import TalkBack, _engine_first_audio

HANG_LIMIT_S = 60  # a bound on waiting for the reader thread (a hang fails; never a timing threshold)


@dataclass
class Stat:
    first_audio_ms: float | None


class Speaker:
    """What TalkBack asks of a session: speak a sentence (two chunks), its statistics, the exchanges."""

    def __init__(self) -> None:
        self.dialogue = Dialogue()
        self.spoken: list[str] = []
        self.stats: list[Stat] = []
        self.recorded: list[Exchange] = []
        self.seq = 0
        self.on_chunk = lambda sentence, i: None  # a test's hook, called before each chunk is handed over

    def speak(self, text: str, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        self.spoken.append(text)
        number = len(self.stats)
        try:
            for i in range(2):
                if cancel is not None and cancel.is_set():  # as the engine does between frames
                    return
                self.on_chunk(text, i)
                yield np.full(480, number + i / 10, np.float32)
        finally:
            self.stats.append(Stat(first_audio_ms=100.0 * (number + 1)))

    def new_exchange(self, user: str) -> Exchange:
        self.seq += 1
        return Exchange(user, "", partial=True, seq=self.seq)

    def record(self, exchange: Exchange) -> None:
        self.recorded.append(exchange)
        self.dialogue.put(exchange)


class Writer:
    """An LLM reply as pieces; ``hold_after`` pieces, it waits until ``go`` is set. Records its close
    (which raises ``close_fails`` when given)."""

    def __init__(self, pieces: list[str], hold_after: int | None = None, fail: Exception | None = None,
                 plain: bool = False, close_fails: Exception | None = None) -> None:  # fmt: skip
        self.pieces, self.hold_after, self.fail, self.plain = pieces, hold_after, fail, plain
        self.close_fails = close_fails
        self.go, self.holding = threading.Event(), threading.Event()
        self.closed = threading.Event()
        self.sent = 0
        self.asked: list[list[dict[str, str]]] = []

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        self.asked.append(messages)
        if self.plain:  # an iterator with no close(), as a writer may return
            return iter(self.pieces)
        self.stream = Stream(self._stream(), self.close_fails)
        return self.stream

    def _stream(self) -> Iterator[str]:
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.hold_after:
                    self.holding.set()
                    assert self.go.wait(HANG_LIMIT_S)
                self.sent += 1
                yield piece
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed.set()


class Stream:
    """A reply stream whose close may fail (a connection that breaks while hanging up)."""

    def __init__(self, pieces: Iterator[str], close_fails: Exception | None) -> None:
        self.pieces, self.close_fails = pieces, close_fails
        self.hung_up = False  # close() called (dropping the stream is not hanging up: a socket stays open)

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def close(self) -> None:
        self.hung_up = True
        self.pieces.close()  # type: ignore[attr-defined]
        if self.close_fails is not None:
            raise self.close_fails


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that ended a thread (the reader must never end with one)."""
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


def talk(writer: Writer, speaker: Speaker | None = None) -> tuple[TalkBack, Speaker, list[str], list[str]]:
    speaker = speaker or Speaker()
    shown: list[str] = []
    ends: list[str] = []
    tb = TalkBack(speaker, writer, lambda: "be brief", on_text=shown.append, on_end=lambda: ends.append("end"))
    return tb, speaker, shown, ends


def wait_for(condition: Any) -> None:
    deadline = time.monotonic() + HANG_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, "the reader never got there"
        time.sleep(0.002)


def test_a_whole_reply_is_shown_spoken_and_recorded_complete() -> None:
    writer = Writer(["Hello there. ", "How are", " you? Fine."])
    tb, speaker, shown, ends = talk(writer)
    reply = tb.reply("hi")
    audio = list(reply)
    assert shown == writer.pieces and ends == ["end"]
    assert speaker.spoken == ["Hello there.", "How are you?", "Fine."] and len(audio) == 6
    assert [(e.reply, e.partial) for e in speaker.recorded] == [
        ("Hello there.", True), ("Hello there. How are you?", True), ("Hello there. How are you? Fine.", True),
        ("Hello there. How are you? Fine.", False)]
    assert {e.seq for e in speaker.recorded} == {1} and {e.user for e in speaker.recorded} == {"hi"}
    assert reply.error is None and not reply.timing.partial and reply.timing.sentences == 3
    assert writer.asked[0][0] == {"role": "system", "content": "be brief"} and writer.asked[0][-1]["content"] == "hi"


def test_the_timings_are_this_replys_own() -> None:
    speaker = Speaker()
    for _ in range(3):  # earlier replies left statistics behind
        speaker.stats.append(Stat(first_audio_ms=5.0))
    start = time.monotonic()
    reply = talk(Writer(["One. ", "Two."]), speaker)[0].reply("hi")
    list(reply)
    elapsed = time.monotonic() - start
    t = reply.timing
    assert t.engine_first_audio_s == pytest.approx(0.4)  # the first segment this reply spoke (its 4th)
    assert t.first_sentence_s is not None and t.first_audio_s is not None
    assert 0 <= t.first_sentence_s <= t.first_audio_s <= elapsed  # from the start of this reply, in order
    assert t.sentence_to_audio_s == pytest.approx(t.first_audio_s - t.first_sentence_s)


def test_the_engines_first_audio_comes_from_the_segments_after_the_mark() -> None:
    a, b, c = Stat(10.0), Stat(None), Stat(30.0)
    assert _engine_first_audio([a, b, c], a) is None  # the first segment after a had no audio
    assert _engine_first_audio([a, c], a) == pytest.approx(0.03)
    assert _engine_first_audio([a, b, c], c) is None  # nothing after the mark
    assert _engine_first_audio([a, c], None) == pytest.approx(0.01)  # no mark: the first of all


def test_a_cleared_memory_in_the_reply_is_skipped_not_obeyed() -> None:
    tb, speaker, _, _ = talk(Writer(["Hello. ", "$CLEAR$", "\n", "Still here."]))
    reply = tb.reply("hi")
    list(reply)
    assert speaker.spoken == ["Hello.", "Still here."] and not reply.timing.partial
    assert speaker.recorded[-1].reply == "Hello. Still here."


def test_a_reader_that_fails_unexpectedly_ends_the_turn_with_one_line() -> None:
    writer = Writer(["Said first. ", "And then"], fail=ValueError("a bad chunk"))
    tb, speaker, _, ends = talk(writer)
    reply = tb.reply("hi")
    list(reply)
    assert str(reply.error) == "unexpected ValueError while reading the reply: a bad chunk"
    assert speaker.spoken == ["Said first."]  # the sentences received whole are still spoken
    assert reply.timing.partial and speaker.recorded[-1].partial and ends == ["end"]


def test_a_server_failure_keeps_its_own_line() -> None:
    tb, speaker, _, _ = talk(Writer(["Said first. "], fail=CompanionError("the LLM server went away")))
    reply = tb.reply("hi")
    list(reply)
    assert str(reply.error) == "the LLM server went away" and speaker.recorded[-1] == Exchange("hi", "Said first.", True, 1)


def test_a_writer_without_close_is_read_to_its_end(thread_errors: list[BaseException]) -> None:
    tb, speaker, _, _ = talk(Writer(["One. ", "Two."], plain=True))
    reply = tb.reply("hi")
    list(reply)
    reply._reader.join(HANG_LIMIT_S)
    assert speaker.spoken == ["One.", "Two."] and reply.error is None and not reply.timing.partial
    assert thread_errors == []


def test_a_hang_up_that_fails_still_ends_the_reply(thread_errors: list[BaseException]) -> None:
    writer = Writer(["First one. ", "Second."], hold_after=1, close_fails=OSError("connection reset"))
    tb, speaker, _, _ = talk(writer)
    reply = tb.reply("hi")
    next(reply)
    reply.cancel.set()  # Ctrl-C inside the first sentence
    assert list(reply) == [] and speaker.spoken == ["First one."]
    writer.go.set()
    reply._reader.join(HANG_LIMIT_S)
    assert writer.closed.is_set() and thread_errors == []  # no traceback over the conversation


def test_stopping_early_hangs_up_and_shows_nothing_more() -> None:
    writer = Writer(["First one. ", "Second ", "one. ", "Third."], hold_after=1)
    tb, speaker, shown, ends = talk(writer)
    reply = tb.reply("hi")
    next(reply)  # the first chunk of the first sentence
    assert writer.holding.wait(HANG_LIMIT_S)
    reply.close()  # the player stopped: not a cancel (the turn's cancel is never set)
    assert not reply.cancel.is_set() and ends == ["end"]
    writer.go.set()  # the server goes on sending: the reader must hang up at its next piece
    reply._reader.join(HANG_LIMIT_S)
    assert writer.stream.hung_up and writer.closed.is_set()
    assert shown == ["First one. "] and writer.sent == 2
    assert speaker.recorded == []  # the first sentence was cut inside: nothing was spoken whole


def test_a_reply_closed_before_it_started_ends_once_and_hangs_up() -> None:
    writer = Writer(["Never spoken. "], hold_after=0)
    tb, speaker, shown, ends = talk(writer)
    reply = tb.reply("hi")
    assert writer.holding.wait(HANG_LIMIT_S)
    reply.close()
    reply.close()
    assert ends == ["end"]
    writer.go.set()
    assert writer.closed.wait(HANG_LIMIT_S)
    assert shown == [] and speaker.spoken == [] and speaker.recorded == []


def test_a_reply_closed_after_its_end_does_not_end_twice() -> None:
    tb, _, _, ends = talk(Writer(["Done. "]))
    reply = tb.reply("hi")
    list(reply)
    reply.close()
    assert ends == ["end"]


def test_a_cancel_between_chunks_keeps_the_sentences_spoken_whole() -> None:
    speaker = Speaker()
    writer = Writer(["First. ", "Second. ", "Third."])
    tb, _, _, _ = talk(writer, speaker)
    reply = tb.reply("hi")
    speaker.on_chunk = lambda sentence, i: reply.cancel.set() if (sentence, i) == ("Second.", 1) else None
    audio = list(reply)
    assert len(audio) == 4 and speaker.spoken == ["First.", "Second."]
    assert speaker.recorded[-1] == Exchange("hi", "First.", True, 1) and reply.timing.partial


def test_the_reader_thread_never_keeps_the_program_alive() -> None:
    writer = Writer(["Waiting forever. "], hold_after=0)
    tb, _, _, _ = talk(writer)
    reply = tb.reply("hi")
    assert writer.holding.wait(HANG_LIMIT_S)
    reader = reply._reader
    assert reader in threading.enumerate() and reader.name == "companion-llm"
    assert reader.daemon  # an LLM that never answers cannot keep the program from exiting
    reply.close()
    writer.go.set()
    reader.join(HANG_LIMIT_S)
