"""Is a reference's transcript plausibly the words spoken in its recording?

Two checks, before the model is loaded:

- **Speaking rate.** The transcript's letters (digits count as letters; a Chinese, Japanese or
  Korean sign counts as ``WIDE_SIGN`` letters, about one syllable) against the seconds of speech the
  VAD found. People speak about ``RATE`` letters a second (measured on the shipped clips, see
  docs/voices.md). A transcript more than ``REFUSE_RATIO`` times faster or slower than that is not
  the recording's words ("Hi" for 100 s of speech, a whole book for 20 s, only emoji): refused. Beyond
  ``WARN_RATIO``: a warning (words missing, or extra words).
- **Script.** CSM-1B's tokenizer and training speech are English: a transcript mostly in another
  script (Han, Arabic, Cyrillic ...) gets a warning that the words may not be what is spoken.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

RATE = 13.0  # letters per second of speech (shipped clips: 12.8-13.5)
REFUSE_RATIO = 3.0
WARN_RATIO = 1.7
EXPECTED_SCRIPT = "LATIN"  # the script of the language the model's tokenizer and speech were trained on
WIDE_SIGN = 3.0  # letters one CJK / kana / hangul sign stands for (one syllable)
_WIDE = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")
_SCRIPT_NAMES = {"CJK": "Han (Chinese characters)", "LATIN": "Latin"}


def _script(char: str) -> str:
    """The Unicode script a letter belongs to, as its name's first word ("LATIN", "CJK", "ARABIC")."""
    try:
        return unicodedata.name(char).split()[0]
    except ValueError:
        return "UNKNOWN"


@dataclass(frozen=True)
class TranscriptCheck:
    """A transcript measured against its recording's speech."""

    letters: float  # weighted letter count (see the module docstring)
    speech_seconds: float
    script: str | None  # the script most of the transcript's letters are in; None when it has none

    @property
    def rate(self) -> float:
        return self.letters / max(self.speech_seconds, 1e-6)

    @property
    def ratio(self) -> float:
        """How many times faster (>1) or slower (<1) than ``RATE`` the transcript would be spoken."""
        return self.rate / RATE

    def _how(self) -> str:
        if self.letters == 0:
            return "the transcript has no words in it"
        factor = self.ratio if self.ratio >= 1 else 1 / self.ratio
        pace = "faster" if self.ratio >= 1 else "slower"
        rate = f"{self.rate:.1f}" if self.rate >= 0.1 else f"{self.rate:.3f}"
        return (f"{self.letters:.0f} letters in {self.speech_seconds:.1f} s of speech would be {rate} a second, "
                f"{factor:.1f}x {pace} than people speak (about {RATE:.0f})")

    def refusal(self, name: str) -> str | None:
        """Why the transcript cannot be the recording's words, or None."""
        if self.letters > 0 and 1 / REFUSE_RATIO <= self.ratio <= REFUSE_RATIO:
            return None
        fix = ("shorten it to the words spoken in this recording" if self.ratio > 1 else
               "give all the words spoken in the recording")
        what = "the transcript is much too long for the recording" if self.ratio > 1 else "the transcript does not match the recording"
        return f"voice '{name}': {what}: {self._how()}: {fix}"

    def warnings(self, name: str) -> list[str]:
        found = []
        if self.refusal(name) is None and not 1 / WARN_RATIO <= self.ratio <= WARN_RATIO:
            missing = "extra words" if self.ratio > 1 else "words missing"
            found.append(f"voice '{name}': the transcript may not match the recording ({missing}?): {self._how()}")
        if self.script is not None and self.script != EXPECTED_SCRIPT:
            script = _SCRIPT_NAMES.get(self.script, self.script.title())
            found.append(f"voice '{name}': the transcript is mostly in {script} script, but the model reads "
                         "English in Latin script: check it is the words spoken in the recording")
        return found


def check_transcript(transcript: str, speech_seconds: float) -> TranscriptCheck:
    """Measure ``transcript`` against ``speech_seconds`` of speech (what the VAD found in the recording)."""
    letters = 0.0
    scripts: dict[str, float] = {}
    for char in transcript:
        category = unicodedata.category(char)
        if category[0] not in "LN":
            continue
        script = _script(char)
        weight = WIDE_SIGN if script in _WIDE else 1.0
        letters += weight
        if category[0] == "L":
            scripts[script] = scripts.get(script, 0.0) + weight
    main = max(scripts, key=lambda s: scripts[s]) if scripts else None
    return TranscriptCheck(letters, speech_seconds, main)
