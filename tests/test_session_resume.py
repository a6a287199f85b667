"""Resuming a recorded conversation (``resume_session``), on the tiny checkpoint with a real SQLite history:
which session comes back, what is said when none can, and what each voice comes back with (its codes,
its profile and settings, a reference it got since), the voice store and reference cache the resumed
session works with, and the positions its turns take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_session import make_engine, make_settings

from companion.engine import Engine
from companion.errors import CompanionError
from companion.refcache import ReferenceCache
from companion.session import Session, resume_session
from companion.store import Store
from companion.voices import GenerationOverrides, VoiceProfile, VoiceStore

SEQ = 2048
TIGHT = 512  # guest's reference and another recording of it do not both fit


OTHER = "guest_16k.wav"  # the same words recorded otherwise (16 kHz): other codes


def profile(data_dir: Path, name: str, audio: str | None = "guest.mp3", speaker: int = 0, **kw: object) -> VoiceProfile:
    if audio is None:
        return VoiceProfile(name=name, speaker=speaker, **kw)  # type: ignore[arg-type]
    return VoiceProfile(name=name, audio=[str(data_dir / audio)], transcript_file=str(data_dir / "guest.txt"),
                        speaker=speaker, **kw)  # type: ignore[arg-type]  # fmt: skip


def voices_with(data_dir: Path, *more: VoiceProfile) -> VoiceStore:
    """A voice store with guest (speaker 0, guest.mp3) and ``more``."""
    voices = VoiceStore()
    for each in (profile(data_dir, "guest"), *more):
        voices.add(each)
    return voices


def test_resume_takes_the_session_it_is_named_and_else_the_latest(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = voices_with(data_dir)
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        sessions = []
        for line in ("One.", "Two."):
            session = Session(engine, settings, store, voices)
            list(session.speak(line, voice="guest"))
            sessions.append(session.session_id)
        named = resume_session(engine, settings, store, sessions[0], voices)
        assert named.session_id == sessions[0] and [t.text for t in named.context.turns] == ["One."]
        latest = resume_session(engine, settings, store, None, voices)
        assert latest.session_id == sessions[1] and [t.text for t in latest.context.turns] == ["Two."]


def test_nothing_to_resume_and_another_model_are_each_said_in_one_line(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = voices_with(data_dir)
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        with pytest.raises(CompanionError) as err:
            resume_session(engine, settings, store, None, voices)
        assert str(err.value) == "there is no saved conversation to resume: start one with `companion chat`"
        session = Session(engine, settings, store, voices)
        list(session.speak("One.", voice="guest"))
        other = Engine(engine.model, engine.processor, "another/model", max_seq_len=SEQ)
        with pytest.raises(CompanionError) as err:
            resume_session(other, settings, store, session.session_id, voices)
        assert str(err.value) == (
            f"session {session.session_id} was recorded with model {engine.model_key!r}, not 'another/model': "
            "resume it with that --model, or start a new conversation")


def test_a_resumed_session_works_with_the_voice_store_and_cache_it_is_given(tiny_model_dir: Path,
                                                                           data_dir: Path) -> None:  # fmt: skip
    voices = voices_with(data_dir, profile(data_dir, "calm", speaker=1, generation=GenerationOverrides(temperature=0.5)),
                         profile(data_dir, "later", audio=OTHER, speaker=2))  # fmt: skip
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    cache = ReferenceCache()
    with Store() as store:
        live = Session(engine, settings, store, voices, cache)
        list(live.speak("guest: Hello. || calm: Hi."))
        resumed = resume_session(engine, settings, store, live.session_id, voices, cache)
        assert resumed.cache is cache  # one cache (and its lock) for every session of a server
        calm = resumed.context.voices["calm"]
        assert calm.generation == {"temperature": 0.5} and resumed.options(calm).temperature == 0.5
        assert calm.profile is not None and calm.profile.name == "calm"
        assert "later" in resumed.known_voices()  # a voice of the store the session never used
        assert resumed.use_voice("later").codes is not None


def test_a_voice_without_a_reference_bootstraps_one_after_resume_and_saves_it_with_its_profile(
    tiny_model_dir: Path, data_dir: Path
) -> None:
    voices = voices_with(data_dir, profile(data_dir, "plain", audio=None, speaker=1))
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        list(live.speak("One.", voice="guest"))
        live.use_voice("plain")  # pinned without a reference: it has none yet
        assert [v.codes is None for v in store.voices(live.session_id) if v.name == "plain"] == [True]
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        plain = resumed.context.voices["plain"]
        assert plain.codes is None and plain.profile is not None and plain.profile.name == "plain"
        list(resumed.speak("Hello there.", voice="plain"))
        assert voices.get("plain").audio  # the reference it made is the profile's now


def test_a_voice_that_got_a_reference_since_comes_back_with_it_and_its_speaker(tiny_model_dir: Path,
                                                                              data_dir: Path) -> None:  # fmt: skip
    voices = voices_with(data_dir, profile(data_dir, "plain", audio=None))
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        list(live.speak("One.", voice="guest"))
        speaker = live.use_voice("plain").speaker  # moved off guest's speaker 0
        assert speaker == 1
        voices.add(profile(data_dir, "plain", audio=OTHER), force=True)  # given a recording since
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        plain = resumed.context.voices["plain"]
        fresh = Session(engine, settings, None, voices).use_voice("plain")
        assert plain.codes is not None and torch.equal(plain.codes, fresh.codes) and plain.speaker == speaker
        [recorded] = [v for v in store.voices(live.session_id) if v.name == "plain"]
        assert recorded.codes is not None and torch.equal(recorded.codes, plain.codes) and recorded.speaker == speaker


def test_a_voice_keeps_its_recorded_reference_when_its_profile_changed(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = voices_with(data_dir)
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        list(live.speak("One.", voice="guest"))
        recorded = live.context.voices["guest"].codes
        voices.add(profile(data_dir, "guest", audio=OTHER), force=True)
        assert not torch.equal(Session(engine, settings, None, voices).use_voice("guest").codes, recorded)
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        assert recorded is not None and torch.equal(resumed.context.voices["guest"].codes, recorded)


def test_turns_come_back_as_they_were_and_numbering_goes_on(tiny_model_dir: Path,
                                                                           data_dir: Path) -> None:  # fmt: skip
    """Turns come back with their numbers, voices, speakers and positions; the next turn and the next
    exchange are numbered after the last recorded ones (three exchanges:
    the last, not the first or second, decides), and a $CLEAR$ right after resuming starts the
    conversation after them: what was said before it never comes back."""
    voices = voices_with(data_dir, profile(data_dir, "host", audio=OTHER, speaker=1))
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        list(live.speak("guest: One. || host: Two."))
        for line in ("a", "b", "c"):
            live.record(live.new_exchange(line))
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        assert [(t.seq, t.voice, t.speaker, t.text, t.positions) for t in resumed.context.turns] == [
            (t.seq, t.voice, t.speaker, t.text, t.positions) for t in live.context.turns]
        assert resumed.context_used() == live.context_used()  # the same positions as live
        assert resumed.new_exchange("d").seq == 4
        resumed.clear()
        assert list(resume_session(engine, settings, store, live.session_id, voices).context.turns) == []
        list(resumed.speak("Three.", voice="guest"))
        again = resume_session(engine, settings, store, live.session_id, voices)
        assert [(t.seq, t.text) for t in again.context.turns] == [(3, "Three.")]


def test_a_conversation_of_exchanges_only_resumes_with_no_voice_and_numbers_from_one(tiny_model_dir: Path,
                                                                                   data_dir: Path) -> None:  # fmt: skip
    """A talk-back exchange recorded before anything was spoken: no voice, no turn. Resumed, nothing is
    active, and after a $CLEAR$ the first turn (number 1) belongs to the conversation."""
    voices = voices_with(data_dir)
    engine, settings = make_engine(tiny_model_dir, SEQ), make_settings(SEQ)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        live.record(live.new_exchange("Are you there?"))
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        assert resumed.active is None and list(resumed.context.voices) == [] and list(resumed.context.turns) == []
        resumed.clear()
        list(resumed.speak("Yes.", voice="guest"))
        again = resume_session(engine, settings, store, live.session_id, voices)
        assert [(t.seq, t.text) for t in again.context.turns] == [(1, "Yes.")] and again.active == "guest"
        fresh = Session(engine, settings, store, voices)  # a conversation with turns and no exchange
        list(fresh.speak("Hello.", voice="guest"))
        assert resume_session(engine, settings, store, fresh.session_id, voices).new_exchange("x").seq == 1


def test_an_active_voice_dropped_to_make_room_is_not_active_after_resume(tiny_model_dir: Path, data_dir: Path) -> None:
    """guest is chosen (recorded as active), then a line for host, whose reference does not fit beside
    guest's, drops guest: resumed, the active voice is one the session still has."""
    voices = voices_with(data_dir, profile(data_dir, "host", audio=OTHER))
    engine, settings = make_engine(tiny_model_dir, TIGHT), make_settings(TIGHT, seconds=0.8)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        live.use_voice("guest")
        list(live.speak("Yes."))
        list(live.speak("host: Hi."))
        assert list(live.context.voices) == ["host"] and live.active == "host"
        resumed = resume_session(engine, settings, store, live.session_id, voices)
        assert list(resumed.context.voices) == ["host"] and resumed.active == "host"
