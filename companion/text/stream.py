"""Cutting a stream of text (an LLM's reply, piece by piece) into sentences as soon as each is complete.

``SentenceSplitter.feed(piece)`` returns the sentences the new text completed; ``flush()`` returns the
rest at the end of the stream. A sentence ends at ``. ! ?`` (or ``…``, closing quotes and brackets
after it); "3.5", "Dr. Smith" and "e.g. this" are not cut, and a period after a digit waits for the
next piece to tell "3." from "3.5". A line break ends a sentence too. A long sentence is cut earlier at a clause mark (``, ; :`` or a dash) once at least
``min_clause_chars`` have arrived, so speech can start, and at the last space before ``max_chars`` when
there is no mark at all. The cuts depend on the text, not on how it was split into pieces (a closing quote arriving just
after its sentence was handed over starts the next one); joining the sentences with spaces gives
back the text's words.
"""

from __future__ import annotations

import re

from companion.text.normalize import TITLES

# A sentence end: terminal punctuation, closing quotes/brackets, then whitespace; or a line break.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|\n")
_CLAUSE_END = re.compile(r"[,;:]+(?=\s)|\s[—–-](?=\s)")
# Words whose period does not end a sentence: titles ("Dr."), "e.g.", "i.e.", "vs.", single initials.
_NO_END = {t.lower() for t in TITLES} | {"e.g.", "i.e.", "vs.", "cf.", "no.", "st."}


class SentenceSplitter:
    def __init__(self, min_clause_chars: int = 60, max_chars: int = 240) -> None:
        self.min_clause_chars = min_clause_chars
        self.max_chars = max_chars
        self.buffer = ""

    def feed(self, piece: str) -> list[str]:
        """The sentences completed by ``piece``, in order (often none)."""
        self.buffer += piece
        out = []
        while (cut := self._cut()) is not None:
            sentence, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:].lstrip()
            if re.search(r"\w", sentence):
                out.append(sentence)
            elif sentence:  # punctuation alone ("..."): keep it with what follows
                self.buffer = sentence + " " + self.buffer
                break
        return out

    def flush(self) -> list[str]:
        """What is left at the end of the stream (one last sentence, or nothing)."""
        rest, self.buffer = self.buffer.strip(), ""
        return [rest] if re.search(r"\w", rest) else []

    def _cut(self) -> int | None:
        """Where the first complete sentence or long-enough clause in the buffer ends, if any."""
        text = self.buffer
        ends = (m.end() for m in _SENTENCE_END.finditer(text)
                if (m.group() == "\n" or self._ends(text, m.start(), m.end())) and re.search(r"\w", text[: m.end()]))
        clauses = (m.end() for m in _CLAUSE_END.finditer(text) if m.start() >= self.min_clause_chars)
        cut = min(next(ends, len(text) + 1), next(clauses, len(text) + 1))
        if cut <= min(len(text), self.max_chars):
            return cut
        if len(text) > self.max_chars:
            space = text.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None

    @staticmethod
    def _ends(text: str, at: int, end: int) -> bool:
        """Whether the punctuation ``text[at:end]`` ends a sentence. At the end of the text so far
        (nothing after it yet) only after a letter: "3." may become "3.5"."""
        if end == len(text) and not (at > 0 and text[at - 1].isalpha()):
            return False
        if text[at] != ".":
            return True
        word = text[: at + 1].rsplit(None, 1)[-1].lstrip("\"'“‘([")  # an abbreviation or an initial ("J.")
        return not (word.lower() in _NO_END or re.fullmatch(r"[A-Za-z]\.", word))
