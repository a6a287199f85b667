"""The conversation session on the tiny checkpoint: budget, pruning, $CLEAR$, long text, voices, cancel.

The engine is the real one; ``RecordingEngine`` only writes down each prompt it is asked to speak
(the session under test cannot fake it) and then generates as usual.
"""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from companion.config import Settings, load_settings
from companion.engine import Engine, GenerationOptions, Segment
from companion.errors import CompanionError
from companion.session import Session, resume_session
from companion.store import Store
from companion.text import normalize, prepare
from companion.voices import VoiceProfile, VoiceStore
from companion.watermark import Watermarker


class RecordingEngine(Engine):
    """The real engine, plus a list of the prompts it was given."""

    prompts: list[tuple[list[Segment], int, str, GenerationOptions]]

    def stream(self, context, speaker, text, options, cancel=None):  # type: ignore[no-untyped-def]
        self.prompts.append((list(context), speaker, text, options))
        return super().stream(context, speaker, text, options, cancel)

    def prompt_positions(self, i: int = -1) -> int:
        context, speaker, text, _ = self.prompts[i]
        return sum(self.segment_positions(s) for s in context) + self.text_positions(speaker, text)


def make_engine(model_dir: Path, max_seq_len: int) -> RecordingEngine:
    engine = RecordingEngine.load(str(model_dir), max_seq_len=max_seq_len)
    engine.prompts = []
    return engine


def make_settings(max_seq_len: int, seconds: float = 1.2, watermark: bool = False) -> Settings:
    return load_settings(overrides={
        "generation": {"max_segment_seconds": seconds, "seed": None},
        "context": {"max_seq_len": max_seq_len},
        "watermark": {"enabled": watermark},
    })


def add_profile(data_dir: Path, name: str, audio: str | None = "guest.mp3", transcript: str = "guest.txt",
                speaker: int = 0) -> VoiceStore:
    store = VoiceStore()
    if audio is None:
        store.add(VoiceProfile(name=name, speaker=speaker))
    else:
        store.add(VoiceProfile(name=name, audio=[str(data_dir / audio)], transcript_file=str(data_dir / transcript),
                               speaker=speaker))
    return store


def same_segment(a: Segment, b: Segment) -> bool:
    return a.speaker == b.speaker and a.text == b.text and a.codes is not None and b.codes is not None \
        and torch.equal(a.codes, b.codes)


WORDS = ["Yes.", "Right.", "Sure.", "Hi.", "Good.", "Fine."]  # one syllable: one segment each


def tensors_held(engine: RecordingEngine) -> int:
    """Tensors alive in the process, but for the prompts the test itself records: what the session (and
    everything else) keeps, counted rather than measured as resident memory (which depends on the
    allocator and the machine; benchmarks/unit_figures.py measures that)."""
    gc.collect()
    recorded = {id(s.codes) for context, *_ in engine.prompts for s in context}
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and id(o) not in recorded)


@pytest.mark.slow
def test_200_turns_stay_in_budget_with_the_reference_in_every_prompt(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 640)
    settings = make_settings(640, seconds=0.8)  # 10 frames a turn
    with Store() as store:
        session = Session(engine, settings, store, add_profile(data_dir, "guest"))
        reference = session.use_voice("guest").segment()
        assert reference is not None
        sizes: dict[int, int] = {}
        for turn in range(1, 201):
            audio = list(session.speak(WORDS[turn % len(WORDS)]))  # one segment per line
            assert audio and len(engine.prompts) == turn
            context, _, _, options = engine.prompts[-1]
            assert engine.prompt_positions() + options.max_frames <= engine.max_seq_len  # the budget holds
            assert engine.last_stats.prompt_positions + options.max_frames <= engine.max_seq_len
            assert same_segment(context[0], reference)  # the reference leads every prompt
            if turn in (50, 200):
                sizes[turn] = tensors_held(engine)
        assert sum(s.dropped_turns for s in session.stats) > 100  # it really pruned, again and again
        assert len(store.turns(session.session_id)) == 200
        print("tensors alive at turns 50 and 200:", sizes)
        assert abs(sizes[200] - sizes[50]) <= 10, sizes  # one tensor kept per turn would add 150


def test_after_clear_the_next_prompt_is_the_reference_plus_the_new_text(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    session = Session(engine, make_settings(1024), None, add_profile(data_dir, "guest"))
    reference = session.use_voice("guest").segment()
    for line in ("One.", "Two.", "Three."):
        list(session.speak(line))
    assert len(engine.prompts[-1][0]) == 3  # reference + two turns
    assert list(session.speak("$CLEAR$")) == []
    assert len(engine.prompts) == 3  # clearing generates nothing
    list(session.speak("Four."))
    context, speaker, text, _ = engine.prompts[-1]
    assert len(context) == 1 and same_segment(context[0], reference)
    assert (speaker, text) == (reference.speaker, "Four.")
    assert engine.last_stats.prompt_positions == engine.prompt_positions()
    # the engine reused the cached reference prefix: at most the new text was prefilled
    assert 1 <= engine.last_stats.prefill_positions <= engine.text_positions(speaker, "Four.")


def test_long_text_is_spoken_as_segments_in_order_each_added_to_the_context(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1536)
    session = Session(engine, make_settings(1536, seconds=3.0), None, add_profile(data_dir, "guest"))
    session.use_voice("guest")
    text = "It is 10:30. We meet Dr. Lee at 11. Bring $5 and 3 apples, please. Then we rest for a while, and talk."
    expected = prepare(text, 3.0)
    assert len(expected) >= 3
    list(session.speak(text))
    assert [p[2] for p in engine.prompts] == expected
    for i in range(1, len(expected)):  # each segment is the last turn of the next prompt
        assert engine.prompts[i][0][-1].text == expected[i - 1]
    assert [t.text for t in session.context.turns] == expected


def test_a_reference_that_cannot_fit_is_refused_with_the_seconds_that_would(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 512)
    session = Session(engine, make_settings(512), None, VoiceStore())  # the shipped example: 118 s
    with pytest.raises(CompanionError, match=r"voice 'narrator'.*does not fit.*at most ([\d.]+) s") as err:
        session.use_voice("narrator")
    seconds = float(re.search(r"at most ([\d.]+) s", str(err.value)).group(1))
    assert 0 < seconds < 30
    assert session.context.voices == {}


def test_a_text_too_long_for_the_context_is_split_between_words(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 600)
    session = Session(engine, make_settings(600, seconds=25.0 / 12.5), None, add_profile(data_dir, "guest"))
    session.use_voice("guest")  # leaves ~100 positions for text: a long sentence must be cut
    words = "the quick brown fox jumps over the lazy dog " * 6
    list(session.speak(words))
    spoken = [p[2] for p in engine.prompts]
    assert len(spoken) > 1 and " ".join(spoken).split() == normalize(words).split()
    for i in range(len(spoken)):
        assert engine.prompt_positions(i) + engine.prompts[i][3].max_frames <= 600


def test_cancel_stops_and_keeps_nothing(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    with Store() as store:
        session = Session(engine, make_settings(1024, seconds=2.0), store, add_profile(data_dir, "guest"))
        session.use_voice("guest")
        list(session.speak("Kept."))
        before = [t.seq for t in session.context.turns]
        cancel = threading.Event()
        chunks = []
        for chunk in session.speak("This one is cancelled.", cancel=cancel):
            chunks.append(chunk)
            cancel.set()
        assert len(chunks) == 1  # stopped after the first chunk
        assert session.stats[-1].cancelled and session.stats[-1].frames < session.max_frames()
        assert [t.seq for t in session.context.turns] == before
        assert [t.text for t in store.turns(session.session_id)] == ["Kept."]
        list(session.speak("Next."))  # the session goes on
        assert [t.text for t in store.turns(session.session_id)] == ["Kept.", "Next."]


def test_abandoning_the_iterator_is_a_cancel(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    session = Session(engine, make_settings(1024, seconds=2.0), None, add_profile(data_dir, "guest"))
    session.use_voice("guest")
    stream = session.speak("Never finished.")
    next(stream)
    stream.close()
    assert list(session.context.turns) == [] and session.stats[-1].cancelled


def test_two_voices_named_and_alternating(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1536)
    voices = add_profile(data_dir, "guest")
    add_profile(data_dir, "guest16", "guest_16k.wav")  # same speaker id 0 in its profile
    session = Session(engine, make_settings(1536), None, voices)
    session.use_voice("guest")
    list(session.speak("guest16: Hello."))
    guest, guest16 = session.context.voices["guest"], session.context.voices["guest16"]
    assert guest.speaker != guest16.speaker  # each voice gets its own speaker id
    assert engine.prompts[-1][1] == guest16.speaker and engine.prompts[-1][2] == "Hello."
    refs = engine.prompts[-1][0][:2]
    assert same_segment(refs[0], guest.segment()) and same_segment(refs[1], guest16.segment())
    assert session.active == "guest"  # a named line does not switch the voice
    list(session.speak("A. || B. || C."))
    assert [(p[1], p[2]) for p in engine.prompts[-3:]] == [(guest.speaker, "A."), (guest16.speaker, "B."), (guest.speaker, "C.")]
    assert [t.voice for t in session.context.turns] == ["guest16", "guest", "guest16", "guest"]
    with pytest.raises(CompanionError, match="unknown voice 'nobody'"):
        session.use_voice("nobody")
    n = len(engine.prompts)
    list(session.speak("Note: not a voice name."))
    assert " ".join(p[2] for p in engine.prompts[n:]) == "Note: not a voice name."


def test_a_reference_less_voice_keeps_the_same_reference_across_sessions(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = add_profile(data_dir, "plain", audio=None)
    engine = make_engine(tiny_model_dir, 1024)
    with Store() as store:
        first = Session(engine, make_settings(1024, seconds=3.0), store, voices)
        first.use_voice("plain")
        list(first.speak("Hello there."))
        assert engine.prompts[-1][0] == []  # the first segment is made without context ...
        assert engine.prompts[-1][3].seed is not None  # ... and with a fixed seed
        reference = first.context.voices["plain"].segment()
        assert reference is not None and reference.text == "Hello there."
        list(first.speak("How are you?"))
        assert len(engine.prompts[-1][0]) == 1 and same_segment(engine.prompts[-1][0][0], reference)
        assert [t.kind for t in store.turns(first.session_id)] == ["reference", "turn"]
    saved = VoiceStore().get("plain")
    assert saved.audio == ["plain.wav"] and saved.transcript == "Hello there."
    # a second session, with a fresh engine, voice store and cache, as a new process would have
    engine2 = make_engine(tiny_model_dir, 1024)
    second = Session(engine2, make_settings(1024, seconds=3.0), None, VoiceStore())
    second.use_voice("plain")
    list(second.speak("Something else entirely."))
    assert same_segment(engine2.prompts[-1][0][0], reference)  # the same pinned reference (same codes)
    assert second.cache.hits == 1


def test_context_report_and_audio(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    session = Session(engine, make_settings(1024), None, add_profile(data_dir, "guest"))
    session.use_voice("guest")
    a = np.concatenate(list(session.speak("One.")))
    b = np.concatenate(list(session.speak("Two.")))
    assert np.array_equal(session.last_reply_audio(), b)
    whole = session.conversation_audio()
    gap = len(whole) - len(a) - len(b)
    assert gap > 0 and np.array_equal(whole[: len(a)], a) and np.array_equal(whole[-len(b):], b)
    rows = session.context_report()
    assert rows[0].pinned and rows[0].what.startswith("reference guest")
    assert [r.pinned for r in rows[1:]] == [False, False, False]
    assert sum(r.positions for r in rows[:-1]) == session.context_used()
    assert rows[-1].positions == session.max_frames()
    stats = session.stats[-1]
    assert stats.text == "Two." and stats.frames * 1920 == len(b) and stats.audio_seconds == stats.frames / 12.5
    # timed by the session from before it called the engine: at least the engine's own time to that first chunk,
    # and within the segment's whole wall time (rtf x audio seconds)
    engine_ms = engine.last_stats.first_audio_ms
    assert stats.first_audio_ms is not None and engine_ms is not None and stats.rtf is not None
    assert engine_ms <= stats.first_audio_ms <= stats.rtf * stats.audio_seconds * 1000


def test_watermark_is_applied_to_what_is_heard(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = add_profile(data_dir, "guest")
    plain = Session(make_engine(tiny_model_dir, 1024), make_settings(1024), None, voices)
    plain.overrides["seed"] = 7
    plain.use_voice("guest")
    raw = list(plain.speak("Marked."))
    marked_session = Session(make_engine(tiny_model_dir, 1024), make_settings(1024, watermark=True), None, voices)
    marked_session.overrides["seed"] = 7
    marked_session.use_voice("guest")
    marked = list(marked_session.speak("Marked."))
    marker = Watermarker(marked_session.settings.watermark.key)
    expected = [marker.apply(chunk) for chunk in raw]
    assert len(marked) == len(raw)
    for got, want, orig in zip(marked, expected, raw, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert not np.array_equal(got, orig)


def test_resume_restores_the_pruned_context_exactly(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = add_profile(data_dir, "guest")
    add_profile(data_dir, "plain", audio=None)
    engine = make_engine(tiny_model_dir, 640)
    settings = make_settings(640, seconds=0.8)
    with Store() as store:
        live = Session(engine, settings, store, voices)
        live.use_voice("guest")
        for line in ["Yes."] * 3 + ["$CLEAR$"] + ["Right.", "Sure.", "plain: Hi.", "Good."] * 3:
            list(live.speak(line))
        assert sum(s.dropped_turns for s in live.stats) > 0  # pruned along the way
        resumed = resume_session(make_engine(tiny_model_dir, 640), settings, store, live.session_id, VoiceStore())
        want, got = live.context_segments(), resumed.context_segments()
        assert len(got) == len(want) > 2
        assert all(same_segment(a, b) for a, b in zip(want, got, strict=True))
        assert resumed.active == live.active == "guest"
        assert {n: v.speaker for n, v in resumed.context.voices.items()} == {n: v.speaker for n, v in live.context.voices.items()}
