"""A conversation: voices with pinned references, turns, the position budget, pruning, ``$CLEAR$``,
history and resume (see docs/session.md).

The names below load on first use (PEP 562), so that a light submodule (the script reader, the batch
manifest) does not pull in torch and the model code: every command's parser imports those, and
`companion history list` should not pay for the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from companion.lazy import lazy_names

if TYPE_CHECKING:
    from companion.session.audio import AudioLog, TurnStats
    from companion.session.context import MIN_TEXT_POSITIONS, Context, ContextRow, TextTooLong, Turn, Voice
    from companion.session.resume import resume_session
    from companion.session.script import CLEAR, Part, parse_line, read_script
    from companion.session.session import DEFAULT_VOICE, Session

_WHERE = {
    "AudioLog": "audio", "TurnStats": "audio",
    "MIN_TEXT_POSITIONS": "context", "Context": "context", "ContextRow": "context", "TextTooLong": "context",
    "Turn": "context", "Voice": "context",
    "CLEAR": "script", "Part": "script", "parse_line": "script", "read_script": "script",
    "DEFAULT_VOICE": "session", "Session": "session", "resume_session": "resume",
}

__all__ = [
    "CLEAR",
    "DEFAULT_VOICE",
    "MIN_TEXT_POSITIONS",
    "AudioLog",
    "Context",
    "ContextRow",
    "Part",
    "Session",
    "TextTooLong",
    "Turn",
    "TurnStats",
    "Voice",
    "parse_line",
    "read_script",
    "resume_session",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())
