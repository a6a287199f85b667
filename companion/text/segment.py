"""Split speakable text into sentences and pack them into segments that fit one generation.

A segment is generated in one go and capped at ``max_frames`` (25 s by default), so each must be
*estimated* to take less than ``max_seconds`` of speech. The estimate is deliberately slow-spoken:

    seconds = syllables / SYLLABLES_PER_SECOND + PAUSE_SENTENCE * sentence ends + PAUSE_CLAUSE * clause marks

Conversational English runs at 4-5 syllables per second; CSM at temperature 0.9 often speaks slower
and pauses, so 3.5 syllables/s (about 150 words a minute for 1.4-syllable words) keeps the estimate above
the real length for nearly every segment.

Packing is greedy and in order: whole sentences while they fit; a sentence too long alone is split at
clause boundaries (``, ; : --``), and a clause too long alone at word boundaries. Joining the segments
with spaces gives back the input's words exactly (nothing lost, nothing reordered).
"""

from __future__ import annotations

import re

SYLLABLES_PER_SECOND = 3.5
PAUSE_SENTENCE = 0.35  # seconds after . ! ?
PAUSE_CLAUSE = 0.15  # seconds after , ; :

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
_ENDS = re.compile(r"[.!?]+(?=\s|$)")
_CLAUSES = re.compile(r"[,;:](?=\s|$)")


def syllables(word: str) -> int:
    """Estimated syllables of one word (vowel groups, minus a silent final e; at least 1)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return len(re.sub(r"\W", "", word)) and 1  # digits or symbols left over: 1, nothing: 0
    count = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1
    letters = re.sub(r"[^A-Za-z]", "", word)
    if 2 <= len(letters) <= 5 and letters.isupper():
        count = len(letters)  # an acronym, perhaps read letter by letter: API -> A P I
    return max(count, 1)


def _counts(text: str) -> tuple[int, int, int]:
    """(syllables, sentence ends, clause marks) of ``text``: each adds up over texts joined by a space,
    which lets packing grow a segment without reading it again (long text is packed in linear time)."""
    syl = sum(syllables(w) for w in text.split())
    return syl, len(_ENDS.findall(text)), len(_CLAUSES.findall(text))


def _seconds(counts: tuple[int, int, int]) -> float:
    syl, ends, clauses = counts
    return syl / SYLLABLES_PER_SECOND + PAUSE_SENTENCE * ends + PAUSE_CLAUSE * clauses


def _plus(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def estimate_seconds(text: str) -> float:
    """Estimated duration of ``text`` spoken by CSM, in seconds (see the module docstring)."""
    return _seconds(_counts(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of normalized text, in order (the terminal punctuation stays with its sentence)."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if re.search(r"\w", s)]


def _split_words(text: str, max_seconds: float) -> list[str]:
    """Pieces of ``text`` cut between words, each estimated under ``max_seconds`` where a word allows."""
    return pack(text.split(), max_seconds)


def _units(sentence: str, max_seconds: float) -> list[str]:
    """A sentence as it is, or as clauses, or as word runs, so that every unit fits alone."""
    if estimate_seconds(sentence) <= max_seconds:
        return [sentence]
    units: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        if estimate_seconds(clause) <= max_seconds:
            units.append(clause)
        else:
            units.extend(_split_words(clause, max_seconds))
    return units


def pack(units: list[str], max_seconds: float) -> list[str]:
    """Join consecutive units with spaces while the estimate stays within ``max_seconds``."""
    segments: list[str] = []
    current: list[str] = []
    counts = (0, 0, 0)
    for unit in units:
        unit_counts = _counts(unit)
        if current and _seconds(_plus(counts, unit_counts)) > max_seconds:
            segments.append(" ".join(current))
            current, counts = [], (0, 0, 0)
        current.append(unit)
        counts = _plus(counts, unit_counts)
    if current:
        segments.append(" ".join(current))
    return segments


def segment_text(text: str, max_seconds: float = 25.0) -> list[str]:
    """Normalized ``text`` as segments, each estimated under ``max_seconds`` of speech, in order."""
    if max_seconds <= 0:
        raise ValueError("max_seconds must be positive")
    units = [u for s in split_sentences(text) for u in _units(s, max_seconds)]
    return pack(units, max_seconds)
