"""What is to be spoken: normalization into speakable words and segmentation into generation-sized pieces.

``prepare(text, max_seconds)`` is what the session calls: normalize, then split into segments that each
estimate under ``max_seconds`` of speech.
"""

from __future__ import annotations

from companion.text.normalize import normalize
from companion.text.segment import estimate_seconds, segment_text, split_sentences, syllables

__all__ = ["NOTHING_TO_SAY", "estimate_seconds", "normalize", "prepare", "segment_text", "split_sentences", "syllables"]

NOTHING_TO_SAY = "nothing to say in this text: it has no words to speak (only emoji, symbols or control characters)"


def prepare(text: str, max_seconds: float = 25.0) -> list[str]:
    """Speakable segments of ``text`` in order, each estimated under ``max_seconds``; [] if nothing to say."""
    return segment_text(normalize(text), max_seconds)
