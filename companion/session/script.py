"""What a typed line asks for: ``$CLEAR$``, ``name: text`` for a voice, ``a || b`` for alternating voices.

``parse_line`` turns one line into parts; each part is spoken by one voice (``None``: the part's voice
is chosen by alternation). A ``name:`` prefix only counts when ``name`` is a voice the caller knows,
so "Note: buy milk" stays text in a chat; a batch script, where a typo in a voice name would be spoken
aloud, refuses it (``unknown_prefix``). ``\\name:`` is always text: "name: ..." is spoken.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

CLEAR = "$CLEAR$"
ALTERNATE = "||"
_NAMED = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_-]{0,63})\s*:\s*(.*)$", re.S)
# What reads as a voice prefix in a script: a name with a letter in it, a colon, a space ("10:30" and
# "https://..." do not).
_PREFIX = re.compile(r"^\s*([A-Za-z0-9_-]*[A-Za-z][A-Za-z0-9_-]*)\s*:(\s|$)")
ESCAPE = "\\"


@dataclass(frozen=True)
class Part:
    voice: str | None  # a named voice, or None for "the next voice in the alternation"
    text: str


def is_clear(line: str) -> bool:
    return line.strip() == CLEAR


def split_name(text: str, known: Collection[str]) -> Part:
    """``"guest: hi"`` -> Part("guest", "hi") when guest is known; otherwise Part(None, text)."""
    if text.lstrip().startswith(ESCAPE) and _NAMED.match(text.lstrip()[1:]):  # \\name: is text
        return Part(None, text.lstrip()[1:].strip())
    m = _NAMED.match(text)
    if m and m.group(1) in known:
        return Part(m.group(1), m.group(2).strip())
    return Part(None, text.strip())


def parse_line(line: str, known: Collection[str]) -> list[Part]:
    """The parts of ``line`` in order (empty ones dropped). ``$CLEAR$`` is handled by the caller."""
    parts = [split_name(piece, known) for piece in line.split(ALTERNATE)]
    return [p for p in parts if p.text]


def assign_voices(parts: list[Part], order: list[str], active: str) -> list[tuple[str, str]]:
    """(voice, text) for every part: a named part keeps its voice; a single unnamed part gets
    ``active``; unnamed ``a || b`` parts alternate through ``order`` (the session's voices) from ``active``."""
    if len(parts) <= 1:
        return [(p.voice or active, p.text) for p in parts]
    start = order.index(active) if active in order else 0
    return [(p.voice or (order[(start + i) % len(order)] if order else active), p.text) for i, p in enumerate(parts)]


def read_script(text: str) -> list[str]:
    """The utterance lines of a batch script: blank lines and ``#`` comments dropped."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def unknown_prefix(line: str, known: Collection[str]) -> str | None:
    """The first ``name:`` in ``line`` (or in one of its ``a || b`` parts) that is not a voice in ``known``."""
    for piece in line.split(ALTERNATE):
        m = _PREFIX.match(piece)
        if m and m.group(1) not in known:
            return m.group(1)
    return None


def script_lines(text: str, paragraphs: bool = False) -> list[tuple[int, str]]:
    """(line number, utterance) for each utterance of a batch script: blank lines and ``#`` comments
    dropped. With ``paragraphs``, lines wrapped by hand are joined: a blank line ends an utterance
    (a ``$CLEAR$`` line stands alone either way)."""
    found: list[tuple[int, str]] = []
    start = 0
    words: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line and paragraphs and not is_clear(line):
            start, words = start or number, [*words, line]
            continue
        if words:
            found.append((start, " ".join(words)))
            start, words = 0, []
        if line:
            found.append((number, line))
    if words:
        found.append((start, " ".join(words)))
    return found
