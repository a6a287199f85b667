"""The session at its edges, on the tiny checkpoint: a voice without a reference in a context with no
room (and exactly one frame of room) to make one, and what $CLEAR$ and the exchanges with an LLM leave
in the history for the next start."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_session import add_profile, make_engine, make_settings

from companion.errors import CompanionError
from companion.session import Session
from companion.session.context import MIN_TEXT_POSITIONS
from companion.store import Exchange, Store

SECONDS = 4.0  # 50 frames a segment at most (the context has to be at least 64 positions)
TEXT = "Yes."


def needed(engine, speaker: int = 0) -> int:  # noqa: ANN001
    """Positions a first reply needs besides its reference: its frames, the room kept for text, its
    own text and the end frame."""
    frames = max(1, int(SECONDS * engine.frame_rate))
    return frames + MIN_TEXT_POSITIONS + engine.text_positions(speaker, TEXT) + 1


def remembered(session: Session) -> int:
    """Exchanges the LLM would be sent again (one user and one assistant message each)."""
    return len(session.dialogue.messages(None)) // 2


@pytest.mark.parametrize("room", [0, 1, 2, 60])
def test_a_voice_without_a_reference_takes_what_room_the_context_has(tiny_model_dir: Path, data_dir: Path,
                                                                     room: int) -> None:  # fmt: skip
    max_seq_len = needed(make_engine(tiny_model_dir, 1024)) + room
    engine = make_engine(tiny_model_dir, max_seq_len)
    session = Session(engine, make_settings(max_seq_len, seconds=SECONDS), None, add_profile(data_dir, "plain", None))
    if room == 0:
        with pytest.raises(CompanionError) as err:
            list(session.speak(TEXT, voice="plain"))
        assert str(err.value) == (
            f"voice 'plain' has no reference and the context ({max_seq_len} positions) has no room to make one: "
            "raise context.max_seq_len or lower generation.max_segment_seconds")
        return
    assert list(session.speak(TEXT, voice="plain"))
    reference = session.context.voices["plain"].codes
    assert reference is not None and 1 <= reference.shape[1] <= min(room, session.max_frames())
    if room <= 2:
        assert reference.shape[1] == room  # all the room there is, to the frame


def test_clear_is_kept_for_the_next_start_turns_and_exchanges(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    settings = make_settings(1024, seconds=SECONDS)
    with Store() as store:
        voices = add_profile(data_dir, "plain", None)
        session = Session(engine, settings, store, voices)
        for line in ("One.", "Two."):
            list(session.speak(line, voice="plain"))
            exchange = session.new_exchange(line)
            exchange.reply, exchange.partial = f"{line} heard", False
            session.record(exchange)
        assert store.exchanges(session.session_id) == [Exchange("One.", "One. heard", False, 1),
                                                       Exchange("Two.", "Two. heard", False, 2)]  # fmt: skip
        assert remembered(session) == 2
        session.clear()
        assert remembered(session) == 0 and list(session.context.turns) == []
        list(session.speak("Three.", voice="plain"))
        later = session.new_exchange("Three.")
        session.record(later)
        resumed = Session.resume(engine, settings, store, session.session_id, voices)
        assert [t.text for t in resumed.context.turns] == ["Three."]
        assert store.exchanges(session.session_id, remembered=True) == [Exchange("Three.", "", True, 3)]
        assert remembered(resumed) == 1 and list(resumed.context.voices) == ["plain"]


def test_a_session_without_history_clears_and_records_in_memory(tiny_model_dir: Path, data_dir: Path) -> None:
    session = Session(make_engine(tiny_model_dir, 1024), make_settings(1024, seconds=SECONDS), None,
                      add_profile(data_dir, "plain", None))  # fmt: skip
    exchange = session.new_exchange("Hi.")
    session.record(exchange)
    assert remembered(session) == 1 and exchange.seq == 1 and session.new_exchange("Again.").seq == 2
    session.clear()
    assert remembered(session) == 0
