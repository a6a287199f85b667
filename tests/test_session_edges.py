"""The session at its edges, on the tiny checkpoint: a voice without a reference in a context with no
room (and exactly one frame of room) to make one, and what $CLEAR$ and the exchanges with an LLM leave
in the history for the next start."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from test_engine_faults import Attention, attention
from test_session import add_profile, make_engine, make_settings

from companion.errors import CompanionError
from companion.session import Session, resume_session
from companion.session.context import MIN_TEXT_POSITIONS, Voice
from companion.store import Exchange, Store
from companion.voices import VoiceProfile, VoiceStore

SECONDS = 4.0  # 50 frames a segment at most (the context has to be at least 64 positions)
TEXT = "Yes."
LONG = "Number two, please, and the next."  # one segment, several more positions than TEXT


def needed(engine, text: str = TEXT, speaker: int = 0) -> int:  # noqa: ANN001
    """Positions a first reply needs besides its reference: its frames, the room kept for text, its
    own text and the end frame."""
    frames = max(1, int(SECONDS * engine.frame_rate))
    return frames + MIN_TEXT_POSITIONS + engine.text_positions(speaker, text) + 1


def remembered(session: Session) -> int:
    """Exchanges the LLM would be sent again (one user and one assistant message each)."""
    return len(session.dialogue.messages(None)) // 2


@pytest.mark.parametrize(("room", "text"), [(0, TEXT), (1, TEXT), (2, TEXT), (60, TEXT), (0, LONG), (2, LONG)])
def test_a_voice_without_a_reference_takes_what_room_the_context_has(tiny_model_dir: Path, data_dir: Path,
                                                                     room: int, text: str) -> None:  # fmt: skip
    """The room is what the context has left beside the line's own text: a longer line leaves less."""
    max_seq_len = needed(make_engine(tiny_model_dir, 1024), text) + room
    engine = make_engine(tiny_model_dir, max_seq_len)
    session = Session(engine, make_settings(max_seq_len, seconds=SECONDS), None, add_profile(data_dir, "plain", None))
    if room == 0:
        with pytest.raises(CompanionError) as err:
            list(session.speak(text, voice="plain"))
        assert str(err.value) == (
            f"voice 'plain' has no reference and the context ({max_seq_len} positions) has no room to make one: "
            "raise context.max_seq_len or lower generation.max_segment_seconds")
        return
    assert list(session.speak(text, voice="plain"))
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
        resumed = resume_session(engine, settings, store, session.session_id, voices)
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


def test_a_segment_is_kept_only_when_its_audio_was_delivered(tiny_model_dir: Path, data_dir: Path) -> None:
    """A server hands the session a ``delivered()`` check: a segment whose audio did not all reach the
    listener is not remembered (nor recorded), one that did is, whatever the generation said."""
    with Store() as store:
        session = Session(make_engine(tiny_model_dir, 2048), make_settings(2048), store, add_profile(data_dir, "guest"))
        session.delivered = lambda: False
        assert list(session.speak("Not heard.", voice="guest"))
        assert list(session.context.turns) == [] and store.turns(session.session_id) == []
        assert session.stats[-1].cancelled and session.stats[-1].frames > 0
        session.delivered = lambda: True
        assert list(session.speak("Heard.", voice="guest"))
        assert [t.text for t in session.context.turns] == ["Heard."]
        assert [t.text for t in store.turns(session.session_id)] == ["Heard."]
        assert not session.stats[-1].cancelled


def test_a_cancel_during_the_prompt_leaves_a_segment_of_no_frames(tiny_model_dir: Path, data_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ctrl-C while the prompt is read, before the first frame: no audio, statistics of no frames (no
    real-time factor to divide by zero), nothing kept, and the next line is the one a fresh session says."""
    settings = make_settings(2048)
    settings.generation.seed = 7
    voices = add_profile(data_dir, "guest")
    session = Session(make_engine(tiny_model_dir, 2048), settings, None, voices)
    list(session.speak("First.", voice="guest"))
    cancel = threading.Event()
    with attention(monkeypatch, Attention(lambda i: cancel.set())):
        assert list(session.speak("Cut off.", voice="guest", cancel=cancel)) == []
    stats = session.stats[-1]
    assert (stats.frames, stats.audio_seconds, stats.rtf, stats.first_audio_ms, stats.cancelled) == (0, 0.0, None, None, True)
    assert [t.text for t in session.context.turns] == ["First."]
    after = np.concatenate(list(session.speak("Second.", voice="guest")))
    fresh = Session(make_engine(tiny_model_dir, 2048), settings, None, voices)
    list(fresh.speak("First.", voice="guest"))
    assert np.array_equal(after, np.concatenate(list(fresh.speak("Second.", voice="guest"))))


def test_a_voice_without_a_reference_beside_another_takes_only_the_room_left_after_it(tiny_model_dir: Path,
                                                                                     data_dir: Path) -> None:  # fmt: skip
    """guest's reference is pinned; plain, with none, makes one in what the context has left after it:
    exactly two frames here."""
    probe = Session(make_engine(tiny_model_dir, 1024), make_settings(1024, seconds=SECONDS), None,
                    add_profile(data_dir, "guest"))  # fmt: skip
    others = probe.use_voice("guest").positions
    max_seq_len = needed(probe.engine) + others + 2
    voices = VoiceStore()
    for profile in (VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")], transcript_file=str(data_dir / "guest.txt")),
                    VoiceProfile(name="plain", speaker=1)):  # fmt: skip
        voices.add(profile, force=True)
    session = Session(make_engine(tiny_model_dir, max_seq_len), make_settings(max_seq_len, seconds=SECONDS), None, voices)
    session.use_voice("guest")
    assert list(session.speak(TEXT, voice="plain"))
    reference = session.context.voices["plain"].codes
    assert reference is not None and reference.shape[1] == 2 and list(session.context.voices) == ["guest", "plain"]


def test_a_reference_made_after_turns_keeps_them_in_the_conversation_for_resume(tiny_model_dir: Path,
                                                                               data_dir: Path) -> None:  # fmt: skip
    voices = add_profile(data_dir, "guest")
    voices.add(VoiceProfile(name="plain", speaker=1))
    engine, settings = make_engine(tiny_model_dir, 2048), make_settings(2048, seconds=SECONDS)
    with Store() as store:
        session = Session(engine, settings, store, voices)
        for line in ("One.", "Two."):
            list(session.speak(line, voice="guest"))
        list(session.speak("Hello.", voice="plain"))  # plain's reference is made now
        resumed = resume_session(engine, settings, store, session.session_id, voices)
        assert [t.text for t in resumed.context.turns] == ["One.", "Two."]


def test_a_session_without_a_voice_store_says_so_and_keeps_a_made_reference_in_memory(tiny_model_dir: Path,
                                                                                      data_dir: Path) -> None:  # fmt: skip
    engine, settings = make_engine(tiny_model_dir, 1024), make_settings(1024, seconds=SECONDS)
    session = Session(engine, settings, None, None)
    assert session.context_budget() == 1024 - session.max_frames()
    with pytest.raises(CompanionError) as err:
        list(session.speak("Hello.", voice="ghost"))
    assert str(err.value) == "unknown voice 'ghost': this session has no voice store to load it from"
    # A voice added by hand, with the profile it came from but no store to save into: its reference stays
    # in this session's memory.
    session.add_voice(Voice("plain", 0, None, None, profile=VoiceProfile(name="plain")))
    assert list(session.speak("Hello.", voice="plain"))
    assert session.context.voices["plain"].codes is not None


def test_the_sessions_settings_reach_its_context_its_statistics_and_its_segments(tiny_model_dir: Path,
                                                                                data_dir: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The configured prune target is the context's; statistics keep the last STATS_KEPT segments; a
    segment reserves at least one frame however short the configured segment."""
    import companion.session.session as module

    monkeypatch.setattr(module, "STATS_KEPT", 2)
    settings = make_settings(1024, seconds=SECONDS)
    settings.context.prune_to = 0.3
    session = Session(make_engine(tiny_model_dir, 1024), settings, None, add_profile(data_dir, "guest"))
    assert session.context.prune_to == 0.3
    for line in ("One.", "Two.", "Three."):
        list(session.speak(line, voice="guest"))
    assert [s.text for s in session.stats] == ["Two.", "Three."]
    short = Session(session.engine, make_settings(1024, seconds=0.01), None, None)
    assert short.max_frames() == 1
