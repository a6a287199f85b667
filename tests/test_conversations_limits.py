"""The server's conversations on the tiny checkpoint: one more than memory holds, one more than a key may
keep, idle ones swept, and a conversation in use never dropped or deleted. Driven directly (no HTTP),
with a real history file; replies are 3 frames so each costs little.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_session import add_profile

from companion.config import load_settings
from companion.engine import Engine
from companion.errors import CompanionError
from companion.refcache import ReferenceCache
from companion.server.conversations import Conversations, _Then
from companion.store import Store
from companion.voices import VoiceProfile


def make(engine: Engine, store: Store, data_dir: Path, **serve: float) -> Conversations:
    settings = load_settings(overrides={"generation": {"max_segment_seconds": 0.24, "seed": 1}, "serve": serve})
    voices = add_profile(data_dir, "plain", audio=None)
    voices.add(VoiceProfile(name="other", speaker=1))
    return Conversations(engine, settings, store, voices, ReferenceCache())


def say(conversations: Conversations, name: str, namespace: str = "", text: str = "Yes.") -> None:
    chunks = list(conversations.speak(text, "plain", name, threading.Event(), namespace))
    assert chunks


@pytest.fixture(scope="module")
def engine(tiny_engine: Engine) -> Engine:
    """Two streams at once: a reply held half-way while others are spoken (as the server's worker does)."""
    return tiny_engine.sibling(2)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "h.sqlite3") as s:
        yield s


def test_one_more_than_memory_holds_drops_the_least_recently_used(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, live_conversations=2)
    say(conversations, "a")
    say(conversations, "b")
    say(conversations, "a")  # a is used again: b is now the one unused longest
    say(conversations, "c")
    assert list(conversations._live) == [("", "a"), ("", "c")]
    say(conversations, "b")  # it comes back from the history, with its turn
    assert list(conversations._live) == [("", "c"), ("", "b")]
    assert [t["text"] for t in conversations.describe("b")["turns"]] == ["Yes.", "Yes."]


def test_a_conversation_in_use_is_never_dropped_from_memory(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, live_conversations=1)
    reply = conversations.speak("Yes.", "plain", "busy", threading.Event())
    next(reply)  # the reply is under way
    say(conversations, "x")
    say(conversations, "y")
    assert list(conversations._live) == [("", "busy")]  # the one place is busy's: the others make way
    list(reply)  # done: the limit applies to it again at the next trim
    say(conversations, "z")
    assert list(conversations._live) == [("", "z")]


def test_one_more_than_a_key_may_keep_deletes_its_least_recently_used(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, max_conversations=2)
    say(conversations, "a", "k1")
    say(conversations, "b", "k1")
    say(conversations, "a", "k2")  # another key's: not counted against k1
    say(conversations, "a", "k1")  # used again: b is the one unused longest
    say(conversations, "c", "k1")
    assert [name for name, _ in store.conversations("k1")] == ["a", "c"]
    assert [name for name, _ in store.conversations("k2")] == ["a"]
    assert conversations.describe("b", "k1") is None and ("k1", "b") not in conversations._live


def test_the_key_limit_never_deletes_a_conversation_in_use(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, max_conversations=2)
    reply = conversations.speak("Yes.", "plain", "busy", threading.Event(), "k")
    next(reply)
    say(conversations, "b", "k")
    say(conversations, "c", "k")  # busy is the oldest, but in use: b goes
    assert [name for name, _ in store.conversations("k")] == ["busy", "c"]
    list(reply)
    assert [t.text for t in store.turns(store.conversation_session_id("busy", "k"))] == ["Yes."]  # kept whole


def test_idle_conversations_are_swept_but_not_one_in_use(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, conversation_days=1.0)
    for name in ("old", "busy", "new"):
        say(conversations, name)
    two_days_ago = (datetime.now(timezone.utc) - timedelta(days=2)).isoformat(timespec="milliseconds")
    store._db.execute("UPDATE sessions SET updated_at = ? WHERE conversation IN ('old', 'busy')", (two_days_ago,))
    reply = conversations.speak("Yes.", "plain", "busy", threading.Event())
    next(reply)
    assert conversations.sweep() == 1  # old; busy is in use
    assert conversations.describe("old") is None and ("", "old") not in conversations._live
    list(reply)
    assert [name for name, _ in store.conversations("")] == ["new", "busy"]


def test_unknown_conversations_are_not_made_by_reading_or_clearing(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    assert conversations.describe("nobody") is None and conversations.clear("nobody") is False
    assert store.conversations("") == [] and conversations._live == {}
    say(conversations, "known")  # its first reply becomes the voice's reference (the voice had no audio)
    say(conversations, "known")
    described = conversations.describe("known")
    assert described is not None and described["id"] == "known" and described["object"] == "conversation"
    assert described["history_id"] == store.conversation_session_id("known") and described["voices"] == ["plain"]
    assert [t["text"] for t in described["turns"]] == ["Yes."]
    assert conversations.clear("known") is True and conversations.describe("known")["turns"] == []
    assert conversations.describe("known", "another key") is None


def test_a_one_shot_request_keeps_nothing(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    assert list(conversations.speak("Yes.", "plain", None, threading.Event()))
    assert conversations._live == {} and store.sessions() == []


def test_a_conversation_is_described_whole(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    say(conversations, "d")
    list(conversations.speak("Right.", "other", "d", threading.Event()))
    session = conversations._live[("", "d")]
    assert conversations.describe("d") == {
        "id": "d", "object": "conversation", "history_id": store.conversation_session_id("d"),
        "voices": ["plain", "other"], "turns": [],  # each voice's first reply became its reference
        "context_positions": session.context_used(), "context_budget": session.context_budget(),
    }  # fmt: skip
    list(conversations.speak("Good.", "other", "d", threading.Event()))
    assert conversations.describe("d")["turns"] == [{"seq": 3, "voice": "other", "text": "Good."}]
    assert 0 < session.context_used() < session.context_budget()


def test_the_voice_asked_for_is_the_one_spoken_and_an_unknown_one_is_refused(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, live_conversations=1)
    for name in (None, "v"):
        with pytest.raises(CompanionError, match="nobody"):
            conversations.speak("Yes.", "nobody", name, threading.Event())
    assert conversations._in_use == {}  # the refused request let go of its conversation
    say(conversations, "x")  # so the limit can drop v now
    assert list(conversations._live) == [("", "x")]
    assert store.conversations("") == [("v", store.conversation_session_id("v")), ("x", store.conversation_session_id("x"))]


def test_a_cancelled_request_speaks_nothing_and_keeps_nothing(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    cancel = threading.Event()
    cancel.set()
    for name in (None, "c"):
        assert list(conversations.speak("Yes.", "plain", name, cancel)) == []
    assert store.turns(store.conversation_session_id("c")) == []


def test_a_finished_reply_leaves_no_delivery_check_behind(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    list(conversations.speak("Yes.", "plain", "w", threading.Event(), delivered=lambda: True))
    assert conversations._live[("", "w")].delivered is None


def test_a_reply_not_delivered_is_not_kept(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir)
    assert list(conversations.speak("Yes.", "plain", "u", threading.Event(), delivered=lambda: False))
    assert store.turns(store.conversation_session_id("u")) == []
    assert list(conversations.speak("Yes.", "plain", "u", threading.Event(), delivered=lambda: True))
    assert [t.text for t in store.turns(store.conversation_session_id("u"))] == ["Yes."]


def test_a_conversation_read_while_its_reply_runs_stays_in_use(engine, store, data_dir) -> None:  # noqa: ANN001
    """Two uses at once (a reply and a read): the read's end must not end the reply's claim."""
    conversations = make(engine, store, data_dir, live_conversations=1)
    reply = conversations.speak("Yes.", "plain", "busy", threading.Event())
    next(reply)
    assert conversations.describe("busy") is not None
    say(conversations, "x")
    assert list(conversations._live) == [("", "busy")]
    list(reply)
    say(conversations, "x")
    assert list(conversations._live) == [("", "x")]


def test_a_conversation_of_a_key_comes_back_from_the_history_as_itself(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, live_conversations=1)
    for name, text in (("a", "One."), ("a", "Two."), ("b", "Bee."), ("b", "Bees."), ("a", "Three.")):
        say(conversations, name, "k", text)  # b pushes a out of memory; a comes back, after b was used last
    assert len(store.conversations("k")) == 2 and store.conversations("") == []
    assert [t["text"] for t in conversations.describe("a", "k")["turns"]] == ["Two.", "Three."]
    assert [t["text"] for t in conversations.describe("b", "k")["turns"]] == ["Bee.", "Bees."]  # a's reference, cached


def test_sweeping_a_conversation_no_longer_in_memory(engine, store, data_dir) -> None:  # noqa: ANN001
    conversations = make(engine, store, data_dir, live_conversations=1, conversation_days=1.0)
    say(conversations, "gone")
    say(conversations, "here")  # gone leaves memory
    two_days_ago = (datetime.now(timezone.utc) - timedelta(days=2)).isoformat(timespec="milliseconds")
    store._db.execute("UPDATE sessions SET updated_at = ?", (two_days_ago,))
    assert conversations.sweep() == 2 and conversations._live == {} and store.conversations("") == []


def test_the_idle_limit_counts_in_utc_whatever_the_machines_zone(engine, store, data_dir, monkeypatch) -> None:  # noqa: ANN001
    import time

    conversations = make(engine, store, data_dir, conversation_days=1.0)
    say(conversations, "recent")
    hours_ago = (datetime.now(timezone.utc) - timedelta(hours=20)).isoformat(timespec="milliseconds")
    store._db.execute("UPDATE sessions SET updated_at = ?", (hours_ago,))
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # 9 hours ahead of UTC
    time.tzset()
    try:
        assert conversations.sweep() == 0  # 20 hours is not a day, wherever the machine is
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [name for name, _ in store.conversations("")] == ["recent"]


# ---- _Then: the reply's end, however it ends ------------------------------------------------------


def counted(pieces: list[object]) -> tuple[_Then, list[int]]:
    calls: list[int] = []

    def chunks() -> Iterator[object]:
        for p in pieces:
            if isinstance(p, BaseException):
                raise p
            yield p

    return _Then(chunks(), lambda: calls.append(1)), calls  # type: ignore[arg-type]


def test_the_end_runs_once_when_a_reply_completes_fails_or_is_closed_early() -> None:
    done, calls = counted([1, 2])
    assert list(done) == [1, 2] and calls == [1]
    assert list(done) == [] and calls == [1]  # iterating again: nothing, and no second end

    failed, calls = counted([1, KeyError("boom"), 3])
    assert next(failed) == 1
    with pytest.raises(KeyError):
        next(failed)
    assert calls == [1]
    with pytest.raises(StopIteration):
        next(failed)

    closed, calls = counted([1, 2])
    closed.close()  # before it started
    closed.close()
    assert calls == [1] and list(closed) == []


def test_closing_a_reply_closes_the_generation_under_it() -> None:
    closed: list[str] = []

    def chunks() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append("generator")

    reply = _Then(chunks(), lambda: closed.append("after"))
    assert next(reply) == 1
    reply.close()
    assert closed == ["generator", "after"]


def test_a_reply_dropped_unstarted_still_ends() -> None:
    import gc

    dropped, calls = counted([1])
    del dropped
    gc.collect()
    assert calls == [1]
