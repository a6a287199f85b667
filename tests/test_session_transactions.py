"""What a reply leaves in memory and history when it does not finish: nothing, whenever it is finalised.

A reply that prunes plans the prune and applies it only when its segment is kept. These tests abandon,
cancel and fail replies at the worst moments (a prune planned, a ``$CLEAR$`` before the abandoned reply
is garbage-collected, a history write that fails) and then compare the session with what it must be.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
from pathlib import Path

import pytest
from test_session import add_profile, make_engine, make_settings

from companion.refcache import ReferenceCache
from companion.server.conversations import Conversations
from companion.session import Session, resume_session
from companion.session.context import Turn
from companion.store import Store

MAX = 512
SECONDS = 0.8  # 10 frames a segment


def full_session(tiny_model_dir: Path, data_dir: Path, store: Store | None = None) -> Session:
    """A session whose next reply prunes: one real turn, copied until the context is over its budget."""
    engine = make_engine(tiny_model_dir, MAX)
    session = Session(engine, make_settings(MAX, seconds=SECONDS), store, add_profile(data_dir, "guest"))
    session.use_voice("guest")
    list(session.speak("Yes."))
    real = session.context.turns[-1]
    seq = real.seq
    while session.context.used() + engine.text_positions(0, "Right.") + session.max_frames() <= MAX:
        seq += 1
        session.context.append(Turn(seq, real.voice, real.speaker, f"turn {seq}", real.codes, real.positions))
    session._next_seq = seq + 1
    return session


def test_a_reply_finalised_after_clear_brings_no_turn_back(tiny_model_dir: Path, data_dir: Path) -> None:
    session = full_session(tiny_model_dir, data_dir)
    engine = session.engine
    turns = len(session.context.turns)
    reply = session.speak("Right.")
    next(reply)  # mid-stream: the prompt went without the oldest turns ...
    assert len(engine.prompts[-1][0]) < 1 + turns
    assert len(session.context.turns) == turns  # ... but memory still holds them
    assert list(session.speak("$CLEAR$")) == []
    del reply
    gc.collect()  # the abandoned reply is finalised now, after the clear
    assert list(session.context.turns) == []
    list(session.speak("Good."))  # the next prompt is the reference and the new text only
    assert len(engine.prompts[-1][0]) == 1 and [t.text for t in session.context.turns] == ["Good."]


def test_a_reply_that_finishes_after_the_conversation_changed_is_not_kept(tiny_model_dir: Path, data_dir: Path) -> None:
    session = full_session(tiny_model_dir, data_dir)
    reply = session.speak("Right.")
    next(reply)
    session.speak("$CLEAR$")
    assert len(list(reply)) > 0  # it is heard to its end, but it was said to a conversation now cleared
    assert list(session.context.turns) == []


def test_a_cancel_inside_a_pruning_reply_leaves_the_context_as_it_was(tiny_model_dir: Path, data_dir: Path) -> None:
    with Store() as store:
        session = full_session(tiny_model_dir, data_dir, store)
        engine = session.engine
        before = [(t.seq, t.text) for t in session.context.turns]
        stored = [t.seq for t in store.turns(session.session_id)]
        cancel = threading.Event()
        for _ in session.speak("Right.", cancel=cancel):
            cancel.set()  # inside the segment (after its first chunk), not between segments
        assert session.stats[-1].cancelled and session.stats[-1].dropped_turns > 0
        assert [(t.seq, t.text) for t in session.context.turns] == before
        assert [t.seq for t in store.turns(session.session_id)] == stored
        pruned = engine.prompts[-1][0]
        list(session.speak("Right."))  # the same reply again prunes the same way and is kept
        assert [s.text for s in engine.prompts[-1][0]] == [s.text for s in pruned]
        kept = [t.text for t in session.context.turns]
        assert kept[-1] == "Right." and len(kept) == len(pruned)  # the prune applied once, with the turn
        start = store.session(session.session_id).context_start
        assert start == session.context.turns[0].seq  # history and memory agree on where the context starts


def test_a_failed_history_write_changes_no_voice(tiny_model_dir: Path, data_dir: Path) -> None:
    """add_voice writes the history first: when that fails, memory is as it was; when it works, both agree."""
    engine = make_engine(tiny_model_dir, MAX)
    voices = add_profile(data_dir, "guest")
    add_profile(data_dir, "guest16", "guest_16k.wav")
    with Store() as store:
        session = Session(engine, make_settings(MAX, seconds=SECONDS), store, voices)
        session.use_voice("guest")
        list(session.speak("Yes."))
        pinned = dict(session.context.voices)
        store._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a read-only disk
        with pytest.raises(sqlite3.OperationalError):
            session.use_voice("guest16")  # its reference does not fit beside guest's: guest would go
        assert session.context.voices == pinned and session.active == "guest"
        assert [v.name for v in store.voices(session.session_id)] == ["guest"]
        store._db.execute("PRAGMA query_only = OFF")
        session.use_voice("guest16")
        assert list(session.context.voices) == [v.name for v in store.voices(session.session_id)]


def test_a_conversation_cleared_after_a_hang_up_stays_empty(tiny_model_dir: Path, data_dir: Path) -> None:
    """The server's way: a reply in a conversation, the client hangs up (the reply is dropped, not
    closed), DELETE clears the conversation, and only then is the reply finalised."""
    engine = make_engine(tiny_model_dir, MAX)
    settings = make_settings(MAX, seconds=SECONDS)
    with Store() as store:
        conversations = Conversations(engine, settings, store, add_profile(data_dir, "guest"), ReferenceCache())
        list(conversations.speak("Yes.", "guest", "c1", threading.Event()))
        session = conversations._live[("", "c1")]
        while session.context.used() + engine.text_positions(0, "Good.") + session.max_frames() <= MAX:
            list(conversations.speak("Right.", "guest", "c1", threading.Event()))  # until the next reply prunes
        assert len(conversations.describe("c1")["turns"]) >= 2
        reply = conversations.speak("Good.", "guest", "c1", threading.Event())
        next(reply)  # the client hangs up here
        assert conversations.clear("c1")
        del reply
        gc.collect()
        assert conversations.describe("c1")["turns"] == []
        resumed = resume_session(engine, settings, store, store.conversation_session_id("c1"))
        assert list(resumed.context.turns) == []  # the history says the same
