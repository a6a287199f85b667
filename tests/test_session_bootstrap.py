"""A voice without a reference makes one from its first reply, and the session keeps what it made: the
history (the reference turn, its timings, the voice's codes, the next turn's number), the profile and the
reference cache (so the next session pins the very same codes), and the active voice across a resume.
On the tiny checkpoint, with a real SQLite history and real profile files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from test_session import add_profile, make_engine, make_settings

from companion.refcache import ReferenceCache
from companion.session import Session, resume_session
from companion.session.context import Voice
from companion.store import Store
from companion.voices import VoiceProfile, VoiceStore

SECONDS = 2.0


def test_a_bootstrapped_reference_is_recorded_saved_and_cached(tiny_model_dir: Path, data_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, 1024)
    settings = make_settings(1024, seconds=SECONDS)
    voices = add_profile(data_dir, "plain", None)
    cache = ReferenceCache()
    with Store() as store:
        session = Session(engine, settings, store, voices, cache)
        list(session.speak("Number 2, please.", voice="plain"))
        voice = session.context.voices["plain"]
        stats = session.stats[-1]
        assert stats.bootstrap and voice.codes is not None and voice.transcript == "Number two, please."
        sid = session.session_id
        assert sid is not None
        # The history: a reference turn with the reply's timings and the line as typed, the voice's codes.
        [ref] = store.turns(sid)
        assert ref.kind == "reference" and torch.equal(ref.codes, voice.codes) and ref.text == voice.transcript
        assert ref.first_audio_ms == stats.first_audio_ms is not None and ref.rtf == stats.rtf is not None
        assert ref.typed == "Number 2, please."
        [recorded] = store.voices(sid)
        assert recorded.name == "plain" and recorded.codes is not None and torch.equal(recorded.codes, voice.codes)
        # The next turn is numbered after the reference turn.
        list(session.speak("Again.", voice="plain"))
        turns = store.turns(sid)
        assert [t.kind for t in turns] == ["reference", "turn"] and turns[1].seq == ref.seq + 1
        assert session.active == "plain"
        # The profile now has the reply as its reference recording; the cache holds its exact codes,
        # marked as generated for this voice and model.
        profile = voices.get("plain")
        assert profile.audio and Path(profile.audio_paths()[0]).exists() and voice.profile == profile
        key = cache.key(profile.audio_paths(), settings.reference, engine.model_key, engine.codec_key)
        cached = cache.get(key)
        assert cached is not None and torch.equal(cached, voice.codes)
        with safe_open(str(cache.path_for(key)), "pt") as f:
            assert f.metadata() == {"voice": "plain", "model": engine.model_key, "source": "generated"}
    # A new session pins the same codes from the cache (not re-encoded from the saved audio).
    later = Session(engine, settings, None, VoiceStore(), cache)
    assert torch.equal(later.use_voice("plain").codes, voice.codes)


def test_without_a_history_the_turn_after_a_bootstrap_is_numbered_after_it(tiny_model_dir: Path) -> None:
    session = Session(make_engine(tiny_model_dir, 1024), make_settings(1024, seconds=SECONDS), None, None,
                      ReferenceCache())  # fmt: skip
    session.add_voice(Voice("plain", 0, None, None))
    list(session.speak("Hello.", voice="plain"))  # the reference: number 1
    list(session.speak("Again.", voice="plain"))
    assert [t.seq for t in session.context.turns] == [2]


def test_a_configured_seed_decides_the_bootstrapped_reference(tiny_model_dir: Path, data_dir: Path) -> None:
    """Without a seed the voice's name fixes one; with one configured, that one is used."""
    engine = make_engine(tiny_model_dir, 1024)

    def reference(seed: int | None) -> torch.Tensor:
        settings = make_settings(1024, seconds=SECONDS)
        settings.generation.seed = seed
        session = Session(engine, settings, None, None, ReferenceCache())
        session.add_voice(Voice("plain", 0, None, None))  # no profile: nothing saved between the runs
        list(session.speak("Hello.", voice="plain"))
        codes = session.context.voices["plain"].codes
        assert codes is not None
        return codes

    by_name, seven, eight = reference(None), reference(7), reference(8)
    assert torch.equal(by_name, reference(None))
    assert not torch.equal(seven, eight) and not torch.equal(seven, by_name)


def test_each_voice_gets_its_own_speaker(tiny_model_dir: Path, data_dir: Path) -> None:
    voices = VoiceStore()
    for name in ("one", "two", "three"):
        voices.add(VoiceProfile(name=name, audio=[str(data_dir / "guest.mp3")],
                                transcript_file=str(data_dir / "guest.txt"), speaker=0))  # fmt: skip
    session = Session(make_engine(tiny_model_dir, 2048), make_settings(2048), None, voices)
    assert [session.use_voice(n).speaker for n in ("one", "two", "three")] == [0, 1, 2]
    assert session.active == "three"


def test_the_active_voice_is_kept_for_resume(tiny_model_dir: Path, data_dir: Path) -> None:
    """Chosen before the first turn (recorded with the new session) and switched later (recorded then)."""
    engine = make_engine(tiny_model_dir, 2048)
    settings = make_settings(2048)
    voices = add_profile(data_dir, "plain")
    voices.add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")],
                            transcript_file=str(data_dir / "guest.txt")))  # fmt: skip
    with Store() as store:
        session = Session(engine, settings, store, voices)
        session.use_voice("plain")
        session.use_voice("guest")  # before the first turn: no session in the history yet
        list(session.speak("Hi."))  # spoken by the active voice, "guest"
        sid = session.session_id
        assert sid is not None and resume_session(engine, settings, store, sid, voices).active == "guest"
        session.use_voice("plain")
        assert resume_session(engine, settings, store, sid, voices).active == "plain"


def test_clear_and_the_last_reply_before_anything_was_said(tiny_model_dir: Path, data_dir: Path) -> None:
    with Store() as store:
        session = Session(make_engine(tiny_model_dir, 1024), make_settings(1024), store, add_profile(data_dir, "plain"))
        session.clear()  # no conversation in the history yet: nothing to record, nothing created
        assert session.session_id is None and store.latest_session_id() is None
        reply = session.last_reply_audio()
        assert reply.dtype == np.float32 and reply.shape == (0,)
