"""What is to be spoken: normalization into speakable words and segmentation into generation-sized pieces.

``prepare(text, max_seconds)`` is what the session calls: normalize, then split into segments that each
estimate under ``max_seconds`` of speech.
"""

from __future__ import annotations

from companion.errors import UsageError
from companion.text.normalize import normalize
from companion.text.segment import estimate_seconds, segment_text, split_sentences, syllables

__all__ = ["BLANK", "NOTHING_TO_SAY", "NothingToSay", "estimate_seconds", "normalize", "prepare", "segment_text",
           "speakable", "split_sentences", "syllables"]

NOTHING_TO_SAY = "nothing to say in this text: it has no words to speak (only emoji, symbols or control characters)"
BLANK = "nothing to say: the text is blank: give some words (say - reads them from stdin)"


class NothingToSay(UsageError):
    """Text with nothing to speak: refused by `say`, `chat`, `batch`, `voice add` and `serve` alike."""


def speakable(text: str, max_seconds: float = 25.0) -> list[str]:
    """The one rule for text with nothing to speak: ``prepare(text)``, or ``NothingToSay`` (blank text,
    or only emoji, symbols or control characters). Every front end calls this; ``str(err)`` is the line."""
    if not text.strip():
        raise NothingToSay(BLANK)
    segments = prepare(text, max_seconds)
    if not segments:
        raise NothingToSay(NOTHING_TO_SAY)
    return segments


def prepare(text: str, max_seconds: float = 25.0) -> list[str]:
    """Speakable segments of ``text`` in order, each estimated under ``max_seconds``; [] if nothing to say."""
    return segment_text(normalize(text), max_seconds)
