"""Talking back on the tiny checkpoint against a real local OpenAI-compatible server (tests/test_llm.py).

The server paces its reply with a gate the test opens (no sleeps, no clocks): each check counts what
the server has sent and what the history database holds.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_llm import KEY, KEY_ENV, FakeOpenAI, serving

from companion.config import LLMSettings, load_settings
from companion.llm import LLMClient
from companion.paths import get_paths
from companion.session import Session, resume_session
from companion.store import Store
from companion.talkback import TalkBack
from companion.text.stream import SentenceSplitter
from companion.voices import VoiceStore

FIRST = "The first sentence is here."


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    yield from serving()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def session(tiny_engine: Any) -> Iterator[Session]:
    settings = load_settings(overrides={"generation": {"max_segment_seconds": 0.5, "seed": 7},
                                        "watermark": {"enabled": False}})
    store = Store(get_paths().history_db)
    s = Session(tiny_engine, settings, store, VoiceStore())
    yield s
    s.close()
    store.close()


def talk(session: Session, base_url: str, model: str, **kw: Any) -> TalkBack:
    settings = LLMSettings(enabled=True, base_url=base_url, model=model, api_key_env=KEY_ENV, **kw)
    return TalkBack(session, LLMClient(settings), lambda: "be brief")


def stored_exchanges() -> list[tuple[str, str, int]]:
    with sqlite3.connect(get_paths().history_db) as db:
        return db.execute("SELECT user_text, reply, partial FROM exchanges ORDER BY seq").fetchall()


def wait_for(check: Any) -> None:
    """Poll a count (never a clock) until it holds; the test fails if it never does."""
    for _ in range(30000):
        if check():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the condition never held")


def test_the_next_turn_sees_the_recorded_reply(session: Session, server: FakeOpenAI) -> None:
    before = len(session.stats)
    reply = talk(session, server.base_url, "llama").reply("hi")
    assert len(list(reply)) > 0 and reply.error is None
    assert stored_exchanges() == [("hi", "Hello there, friend.", 0)]
    assert reply.timing.sentences == 1 and not reply.timing.partial
    # the engine's own time is that of the reply's first segment (not an earlier reply's, not a later one's)
    first_ms = session.stats[before].first_audio_ms
    assert first_ms is not None and reply.timing.engine_first_audio_s == first_ms / 1000
    list(talk(session, server.base_url, "echo").reply("again"))
    sent = server.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["be brief", "hi", "Hello there, friend.", "again"]


def stored_turns() -> str:
    """The text of every turn in the history database (a sentence may take several short segments)."""
    with sqlite3.connect(get_paths().history_db) as db:
        return " ".join(row[0] for row in db.execute("SELECT text FROM turns ORDER BY seq"))


def test_the_first_sentence_is_spoken_before_the_last_token_is_sent(session: Session, server: FakeOpenAI) -> None:
    reply = talk(session, server.base_url, "paced").reply("tell me")
    audio: list[Any] = []
    consumer = threading.Thread(target=lambda: audio.extend(reply))
    consumer.start()
    # the server holds the rest of its reply until the first sentence's turn is in the history database
    wait_for(lambda: stored_turns() == FIRST and stored_exchanges() == [("tell me", FIRST, 1)])
    assert not any("second" in event or "last" in event for event in server.sent)
    # the first sentence's audio was timed while the server still held the rest, after the sentence was complete
    assert reply.timing.first_audio_s is not None and reply.timing.first_sentence_s is not None
    assert reply.timing.first_audio_s > reply.timing.first_sentence_s
    server.release(2)
    consumer.join()
    assert reply.error is None and reply.timing.sentences == 3 and audio
    assert stored_turns() == f"{FIRST} Then the second one. And the last one."
    assert stored_exchanges() == [("tell me", f"{FIRST} Then the second one. And the last one.", 0)]
    timing = reply.timing
    assert timing.first_sentence_s is not None and timing.first_audio_s is not None
    assert timing.sentence_to_audio_s == timing.first_audio_s - timing.first_sentence_s


def test_ctrl_c_stops_the_stream_and_the_speech(session: Session, server: FakeOpenAI) -> None:
    cancel = threading.Event()
    reply = talk(session, server.base_url, "endless").reply("tell me", cancel)
    stopper = threading.Thread(target=lambda: (wait_for(lambda: reply.exchange is not None), cancel.set()))
    stopper.start()
    audio = list(reply)  # ends once cancelled, while the server holds the second sentence
    stopper.join()
    assert audio and stored_exchanges() == [("tell me", FIRST, 1)]  # as far as it was heard, partial
    server.release()
    wait_for(lambda: server.hangups == 1)  # the client hung up instead of reading the rest
    list(talk(session, server.base_url, "echo").reply("next"))
    assert [m["content"] for m in server.requests[-1]["body"]["messages"]] == ["be brief", "tell me", FIRST, "next"]
    assert stored_exchanges()[-1] == ("next", "You said: next", 0)


def test_a_sentence_cut_by_ctrl_c_is_not_recorded_as_spoken(session: Session, server: FakeOpenAI) -> None:
    """The cancel lands inside the second sentence, after its first audio chunk: the exchange keeps the
    first sentence only (marked partial), and the next turn's LLM sees only that."""
    cancel = threading.Event()
    reply = talk(session, server.base_url, "paced").reply("tell me", cancel)
    # the server holds the second sentence until the first one is recorded
    releaser = threading.Thread(target=lambda: (wait_for(lambda: reply.exchange is not None), server.release()))
    releaser.start()
    chunks_of_the_second = 0
    for _chunk in reply:
        if reply.exchange is not None:  # the first sentence is recorded: this chunk is the second one's
            chunks_of_the_second += 1
            cancel.set()
    releaser.join()
    assert chunks_of_the_second == 1  # cancelled inside it: no chunk of it came after the cancel
    assert any("second" in event for event in server.sent)  # it had been written and was being spoken
    assert stored_exchanges() == [("tell me", FIRST, 1)]
    assert reply.timing.sentences == 1 and reply.timing.partial
    server.release()  # the server's last sentence finds the client gone
    list(talk(session, server.base_url, "echo").reply("next"))
    assert [m["content"] for m in server.requests[-1]["body"]["messages"]] == ["be brief", "tell me", FIRST, "next"]


def _down_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize(
    ("case", "message", "heard"),
    [
        ("down", "(connection refused): start the server or fix llm.base_url", None),
        ("stall", "did not answer within 0.5 s: check that it is running, or raise llm.timeout_seconds", None),
        ("401", "refused the request (HTTP 401: Incorrect API key provided: Bearer ***): set $", None),
        ("bad-middle", "sent something that is not JSON", FIRST),
        ("die", "dropped the connection in the middle of the reply: try again", FIRST),
        ("paced", "did not answer within 0.5 s", FIRST),  # stops writing after the first sentence
    ],
)
def test_failures_are_one_line_and_the_next_turn_works(session: Session, server: FakeOpenAI,
                                                       monkeypatch: pytest.MonkeyPatch, case: str, message: str,
                                                       heard: str | None) -> None:
    url = _down_url() if case == "down" else server.base_url
    if case == "401":
        monkeypatch.setenv(KEY_ENV, "sk-wrong")
    reply = talk(session, url, "llama" if case in ("down", "401") else case, timeout_seconds=0.5).reply("tell me")
    audio = list(reply)
    assert reply.error is not None and message in str(reply.error) and "\n" not in str(reply.error)
    assert KEY not in str(reply.error)
    if heard is None:  # nothing was spoken: nothing is recorded, the question can be asked again
        assert audio == [] and stored_exchanges() == []
    else:  # what was spoken stays, marked partial
        assert audio and stored_exchanges() == [("tell me", heard, 1)]
    monkeypatch.setenv(KEY_ENV, KEY)
    nxt = talk(session, server.base_url, "echo").reply("and now?")
    assert list(nxt) and nxt.error is None
    history = ["tell me", heard] if heard else []
    assert [m["content"] for m in server.requests[-1]["body"]["messages"]] == ["be brief", *history, "and now?"]
    assert stored_exchanges()[-1] == ("and now?", "You said: and now?", 0)


def test_think_blocks_are_shown_and_spoken_never(session: Session, server: FakeOpenAI) -> None:
    shown: list[str] = []
    t = talk(session, server.base_url, "thinker")
    t.on_text = shown.append
    list(t.reply("hm"))
    assert "".join(shown) == "Sure, here it is." and stored_exchanges() == [("hm", "Sure, here it is.", 0)]


def test_clear_forgets_both_memories_and_resume_restores_the_rest(session: Session, server: FakeOpenAI,
                                                                  tiny_engine: Any) -> None:
    list(talk(session, server.base_url, "echo").reply("one"))
    session.clear()
    assert session.dialogue.exchanges == [] and len(session.context.turns) == 0
    list(talk(session, server.base_url, "echo").reply("two"))
    assert session.store is not None
    resumed = resume_session(tiny_engine, session.settings, session.store, voices=VoiceStore())
    assert [(e.user, e.reply) for e in resumed.dialogue.exchanges] == [("two", "You said: two")]
    list(talk(resumed, server.base_url, "echo").reply("three"))
    assert [m["content"] for m in server.requests[-1]["body"]["messages"]] == [
        "be brief", "two", "You said: two", "three"]
    assert [e[0] for e in stored_exchanges()] == ["one", "two", "three"]  # the history keeps everything


TEXT = ("Hello there, friend. Dr. Smith paid $3.50 for it! Really? Well, I think that this is a rather long "
        "sentence, with a clause that is cut early; and more. J. R. R. Tolkien wrote it.\nA list:\n- one\n- two "
        + "word " * 60 + "end.")


def test_sentences_do_not_depend_on_how_the_text_arrives() -> None:
    def split(size: int) -> list[str]:
        splitter, out = SentenceSplitter(), []
        for i in range(0, len(TEXT), size):
            out += splitter.feed(TEXT[i : i + size])
        return out + splitter.flush()

    whole = split(len(TEXT))
    assert whole[:6] == ["Hello there, friend.", "Dr. Smith paid $3.50 for it!", "Really?",
                         "Well, I think that this is a rather long sentence, with a clause that is cut early;",
                         "and more.", "J. R. R. Tolkien wrote it."]
    assert all(len(s) <= 240 for s in whole) and " ".join(whole).split() == TEXT.split()
    for size in range(1, 25):
        assert split(size) == whole, size


def test_a_sentence_is_handed_over_as_soon_as_it_is_complete() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("It costs 3.") == []  # "3." may be "3.5"
    assert splitter.feed("5 euros. Then") == ["It costs 3.5 euros."]
    assert splitter.feed(" more") == [] and splitter.flush() == ["Then more"]


def test_interrupt_mode_is_a_setting(tmp_path: Path) -> None:
    assert load_settings(overrides={"llm": {"new_line": "interrupt"}}).llm.new_line == "interrupt"
