"""``resume_session``: a recorded session as it was, from the history (``companion chat --resume``)."""

from __future__ import annotations

from typing import Any

from companion.config import Settings
from companion.engine import Engine, Segment
from companion.errors import CompanionError
from companion.session.context import Turn, Voice
from companion.session.session import Session, voice_record
from companion.store import Store


def resume_session(engine: Engine, settings: Settings, store: Store, session_id: int | None = None,
                   voices: Any = None, cache: Any = None) -> Session:
    """The session ``session_id`` (default: the latest) as it was: the same pinned references, the same
    turns in the context (same codes), the same active voice, the exchanges an LLM is sent again."""
    sid = session_id if session_id is not None else store.latest_session_id()
    if sid is None:
        raise CompanionError("there is no saved conversation to resume: start one with `companion chat`")
    record = store.session(sid)
    if record.model_key != engine.model_key:
        raise CompanionError(
            f"session {sid} was recorded with model {record.model_key!r}, not {engine.model_key!r}: "
            "resume it with that --model, or start a new conversation"
        )
    session = Session(engine, settings, store, voices, cache)
    session.session_id = sid
    for vr in store.voices(sid):
        profile = _profile(voices, vr.name)
        if vr.codes is None and profile is not None and profile.audio:
            voice = session._load_voice(vr.name)  # it got a reference (in another session) since
            voice.speaker = vr.speaker
            store.put_voice(sid, voice_record(voice))
        else:
            generation = profile.generation.as_dict() if profile is not None else {}
            voice = Voice(vr.name, vr.speaker, vr.transcript, vr.codes, generation, profile)
        session.context.pin(voice, session.max_frames())
    turns = store.turns(sid)
    for t in turns:
        if t.kind == "turn" and t.seq >= record.context_start:
            seg = Segment(t.speaker, t.text, t.codes)
            session.context.append(Turn(t.seq, t.voice, t.speaker, t.text, t.codes, engine.segment_positions(seg)))
    session._next_seq = turns[-1].seq + 1 if turns else 1
    for exchange in store.exchanges(sid, remembered=True):
        session.dialogue.put(exchange)
    every = store.exchanges(sid)
    session._next_exchange = every[-1].seq + 1 if every else 1
    session.active = record.voice if record.voice in session.context.voices else next(iter(session.context.voices), None)
    return session


def _profile(voices: Any, name: str) -> Any:
    """The voice's profile, or None where there is no voice store or the profile is gone or unreadable."""
    if voices is None:
        return None
    try:
        return voices.get(name)
    except CompanionError:
        return None
