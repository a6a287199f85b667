"""A conversation: voices with pinned references, turns, the position budget, pruning, ``$CLEAR$``,
history and resume (see docs/session.md)."""

from __future__ import annotations

from companion.session.audio import AudioLog, TurnStats
from companion.session.context import MIN_TEXT_POSITIONS, Context, ContextRow, TextTooLong, Turn, Voice
from companion.session.script import CLEAR, Part, parse_line, read_script
from companion.session.session import DEFAULT_VOICE, Session

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
]
