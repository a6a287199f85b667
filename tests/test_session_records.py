"""What a spoken line leaves behind, on the tiny checkpoint with a real SQLite history: each turn's record
(its timings, the line as typed, its number), the session's statistics, the voices a line used, the
generation settings each voice speaks with, and how a line too long for the context is split."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_session import add_profile, make_engine, make_settings

from companion.engine import Segment
from companion.errors import CompanionError
from companion.session import Session
from companion.session.context import TextTooLong
from companion.store import Store
from companion.text import NOTHING_TO_SAY
from companion.voices import GenerationOverrides, VoiceProfile, VoiceStore


def two_voices(data_dir: Path) -> VoiceStore:
    voices = add_profile(data_dir, "teller")
    voices.add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")],
                            transcript_file=str(data_dir / "guest.txt"), speaker=1))  # fmt: skip
    return voices


def test_a_turn_is_recorded_with_its_timings_and_the_line_as_typed(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 2048)
    with Store() as store:
        session = Session(engine, make_settings(2048, seconds=4.0), store, two_voices(data_dir))
        list(session.speak("I have 2 cats.", voice="guest"))
        stats, last = session.stats[-1], engine.last_stats
        [turn] = store.turns(session.session_id)
        assert turn.kind == "turn" and turn.voice == "guest" and turn.speaker == 1
        assert turn.text == "I have two cats." and turn.typed == "I have 2 cats."
        assert turn.first_audio_ms == stats.first_audio_ms is not None and turn.rtf == stats.rtf is not None
        assert stats.voice == "guest" and not stats.bootstrap and stats.frames == turn.codes.shape[1]
        assert stats.audio_seconds == stats.frames / engine.frame_rate
        assert (stats.prompt_positions, stats.prefill_positions) == (last.prompt_positions, last.prefill_positions)
        [segment] = [s for s in session.context_segments() if s.text == turn.text]
        assert segment.speaker == 1
        # The turn takes the positions of its own speaker's segment ("[1]..."; "[None]..." would be 2 more).
        assert session.context.turns[-1].positions == engine.segment_positions(Segment(1, turn.text, turn.codes))


def test_turns_are_numbered_one_after_another_without_a_history(tiny_model_dir: Path, data_dir: Path) -> None:
    session = Session(make_engine(tiny_model_dir, 2048), make_settings(2048), None, add_profile(data_dir, "guest"))
    for line in ("One.", "Two.", "Three."):
        list(session.speak(line, voice="guest"))
    assert [t.seq for t in session.context.turns] == [1, 2, 3]


def test_a_line_for_two_voices(tiny_model_dir: Path, data_dir: Path) -> None:
    with Store() as store:
        session = Session(make_engine(tiny_model_dir, 4096), make_settings(4096), store, two_voices(data_dir))
        list(session.speak("guest: Hello. || teller: Hi there. || guest: Bye."))
        assert session.reply_voices == ["guest", "teller"] and session.active == "guest"
        turns = store.turns(session.session_id)
        assert [(t.voice, t.typed) for t in turns] == [("guest", "Hello."), ("teller", "Hi there."), ("guest", "Bye.")]
        list(session.speak("teller: Once more."))
        assert session.reply_voices == ["teller"] and session.active == "guest"  # the first line chose it


def test_each_voice_speaks_with_its_own_settings_and_the_sessions_overrides(tiny_model_dir: Path,
                                                                           data_dir: Path) -> None:  # fmt: skip
    voices = add_profile(data_dir, "guest")
    voices.add(VoiceProfile(name="calm", audio=[str(data_dir / "guest.mp3")], transcript_file=str(data_dir / "guest.txt"),
                            generation=GenerationOverrides(temperature=0.5)), force=True)  # fmt: skip
    settings = make_settings(2048)
    settings.generation.temperature, settings.generation.topk = 0.7, 40
    session = Session(make_engine(tiny_model_dir, 2048), settings, None, voices)
    calm, plain = session.use_voice("calm"), session.use_voice("guest")
    assert calm.generation == {"temperature": 0.5}
    assert (session.options(calm).temperature, session.options(calm).topk) == (0.5, 40)
    assert (session.options(plain).temperature, session.options(plain).topk) == (0.7, 40)
    session.overrides = {"topk": 10}
    assert (session.options(calm).temperature, session.options(calm).topk, session.options(calm).seed) == (0.5, 10, None)


def test_without_a_chosen_voice_the_default_one_is_made_at_speaker_0(tiny_model_dir: Path) -> None:
    settings = make_settings(1024, seconds=2.0)
    assert settings.voice is None
    session = Session(make_engine(tiny_model_dir, 1024), settings, None, VoiceStore())
    list(session.speak("Hello."))
    assert list(session.context.voices) == ["default"] and session.context.voices["default"].speaker == 0
    with pytest.raises(CompanionError) as refused:
        session.speak("🎉 🔥")
    assert str(refused.value) == NOTHING_TO_SAY


SECONDS = 20.0  # long enough that none of these lines is split before it meets the context
LINE = ("Yes, all right then, we will walk along the river to the old mill and back again before the rain "
        "comes down on the hills tonight.")


def fitting(tiny_model_dir: Path, data_dir: Path, text: str, spare: int) -> Session:
    """A session whose context has room for ``text`` as one segment beside the reference, plus ``spare``."""
    voices = VoiceStore() if "guest" in VoiceStore().names() else add_profile(data_dir, "guest")
    probe = Session(make_engine(tiny_model_dir, 4096), make_settings(4096, seconds=SECONDS), None, voices)
    voice = probe.use_voice("guest")
    size = probe.max_frames() + probe.context.reference_positions() + probe.engine.text_positions(voice.speaker, text)
    return Session(make_engine(tiny_model_dir, size + spare), make_settings(size + spare, seconds=SECONDS), None, voices)


def test_a_line_that_fits_exactly_is_one_segment_and_one_position_less_splits_it(tiny_model_dir: Path,
                                                                                data_dir: Path) -> None:  # fmt: skip
    exact = fitting(tiny_model_dir, data_dir, LINE, 0)
    assert exact.engine.text_positions(0, LINE) >= 48  # the room a voice's reference leaves for text
    spoken = exact.speak(LINE, voice="guest")
    next(spoken)  # the first segment has started: it was not split
    assert [t for t in exact._fit_text(exact.context.voices["guest"], LINE)] == [LINE]
    short = fitting(tiny_model_dir, data_dir, LINE, -1)
    halves = short._fit_text(short.use_voice("guest"), LINE)
    assert len(halves) == 2 and " ".join(halves) == LINE
    pair = "Supercalifragilisticexpialidocious" * 2 + " " + "Antidisestablishmentarianism" * 2  # two words
    two = fitting(tiny_model_dir, data_dir, pair, -1)
    assert two._fit_text(two.use_voice("guest"), pair) == pair.split()


def test_a_word_too_long_for_the_context_says_what_it_needs(tiny_model_dir: Path, data_dir: Path) -> None:
    word = "Supercalifragilisticexpialidocious" * 4  # one word: it cannot be split
    session = fitting(tiny_model_dir, data_dir, word, -3)
    voice = session.use_voice("guest")
    room = session.context.max_seq_len - session.max_frames() - session.context.reference_positions()
    with pytest.raises(TextTooLong) as refused:
        session._fit_text(voice, word)
    assert refused.value.needed == session.engine.text_positions(voice.speaker, word) + session.max_frames()
    assert refused.value.available == room + session.max_frames()
    assert refused.value.needed == refused.value.available + 3
