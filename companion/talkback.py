"""Talking back: an LLM's reply, spoken sentence by sentence while it is still being written.

A stream transformer between a front end (the REPL, a server) and the session; it knows nothing of
terminals or HTTP. ``TalkBack.reply(user_text, cancel)`` returns a ``SpokenReply``: an iterator of
audio chunks. Three things overlap:

    reader thread:  LLM pieces -> shown (``on_text``) -> SentenceSplitter -> queue of sentences
    the consumer:   queue -> session.speak(sentence) -> audio chunks (normalized, generated in order)
    the player:     plays chunk n while chunk n+1 is generated

so sentence 1 is heard while sentence 2 is generated and the LLM writes sentence 3. After each
sentence is spoken the exchange (the user's line, the reply as spoken so far) is recorded with the
session, marked partial until the reply is complete. A cancel (Ctrl-C), a close of the iterator or a
failure of the server stops the LLM stream and the speech; what was spoken stays recorded, marked
partial, and the failure is raised as its one line after the sentences already received are spoken.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from companion.errors import CompanionError
from companion.session.script import is_clear
from companion.store import Exchange
from companion.text.stream import SentenceSplitter


class ReplyWriter(Protocol):
    """What writes the reply: ``companion.llm.LLMClient`` (or anything streaming text the same way)."""

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]: ...


@dataclass
class ReplyTiming:
    """When things happened during one spoken reply (seconds from the start of ``reply``)."""

    first_sentence_s: float | None = None  # the LLM's first sentence complete
    first_audio_s: float | None = None  # the first audio chunk of that sentence generated
    engine_first_audio_s: float | None = None  # the engine's own: sentence handed to it -> first chunk
    sentences: int = 0  # sentences spoken
    partial: bool = False

    @property
    def sentence_to_audio_s(self) -> float | None:
        """From the end of the LLM's first sentence to its first audio chunk."""
        if self.first_sentence_s is None or self.first_audio_s is None:
            return None
        return self.first_audio_s - self.first_sentence_s


@dataclass
class _Sentence:
    text: str
    at: float  # when it was complete (monotonic)


_END = object()


class TalkBack:
    def __init__(self, session: Any, writer: ReplyWriter, system_prompt: Callable[[], str | None],
                 on_text: Callable[[str], None] | None = None, on_end: Callable[[], None] | None = None,
                 splitter: Callable[[], SentenceSplitter] = SentenceSplitter) -> None:
        self.session = session  # companion.session.Session (driven from the consumer's thread only)
        self.writer = writer
        self.system_prompt = system_prompt  # asked at each reply (the active voice's persona may change)
        self.on_text = on_text or (lambda piece: None)
        self.on_end = on_end or (lambda: None)
        self.splitter = splitter

    def reply(self, user_text: str, cancel: threading.Event | None = None) -> SpokenReply:
        messages = self.session.dialogue.messages(self.system_prompt(), user_text)
        return SpokenReply(self, user_text, messages, cancel or threading.Event())


class SpokenReply:
    """An iterator of (n,) float32 24 kHz audio chunks: the reply spoken as it streams (see the module)."""

    def __init__(self, talk: TalkBack, user_text: str, messages: list[dict[str, str]], cancel: threading.Event) -> None:
        self.talk = talk
        self.user_text = user_text
        self.cancel = cancel
        self.timing = ReplyTiming()
        self.exchange: Exchange | None = None
        self.error: CompanionError | None = None  # why the reply stopped early, when the server failed
        self._start = time.monotonic()
        self._sentences: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()  # tells the reader to hang up
        self._shown = threading.Lock()  # no text is shown after the reply ended (a reader still waiting)
        self._reader = threading.Thread(target=self._read, args=(messages,), name="companion-llm", daemon=True)
        self._reader.start()
        self._chunks = self._speak()

    def __iter__(self) -> SpokenReply:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._chunks)

    def close(self) -> None:
        """Stop now (the player stopped, or the turn was cancelled): hang up, keep what was spoken."""
        self._chunks.close()  # runs the end of ``_speak`` when it had started
        with self._shown:
            if not self._stop.is_set():  # it never started
                self._stop.set()
                self.talk.on_end()

    # ---- the reader thread: LLM pieces -> text shown, sentences queued

    def _read(self, messages: list[dict[str, str]]) -> None:
        splitter = self.talk.splitter()
        pieces = self.talk.writer.reply(messages)
        last: Any = _END
        try:
            for piece in pieces:
                with self._shown:
                    if self._stopped():
                        return
                    self.talk.on_text(piece)
                for sentence in splitter.feed(piece):
                    self._sentences.put(_Sentence(sentence, time.monotonic()))
            for sentence in splitter.flush():
                self._sentences.put(_Sentence(sentence, time.monotonic()))
        except CompanionError as err:
            last = err
        except Exception as err:  # a bug, not the server: still one line, and the turn ends
            last = CompanionError(f"unexpected {type(err).__name__} while reading the reply: {err}")
        finally:
            try:
                getattr(pieces, "close", lambda: None)()  # hangs up when stopped early
            except Exception:  # noqa: BLE001 - hanging up failed: nothing more is read either way
                pass
            self._sentences.put(last)

    def _stopped(self) -> bool:
        return self._stop.is_set() or self.cancel.is_set()

    # ---- the consumer: sentences -> speech, the exchange recorded as it grows

    def _speak(self) -> Generator[np.ndarray, None, None]:
        session, spoken = self.talk.session, []
        complete = False
        try:
            while not self.cancel.is_set():
                item = self._next_sentence()
                if item is None:
                    break  # cancelled while waiting
                if item is _END:
                    complete = True
                    break
                if isinstance(item, CompanionError):
                    self.error = item
                    break
                if is_clear(item.text):
                    continue  # the LLM's text never clears the memory
                if self.timing.first_sentence_s is None:
                    self.timing.first_sentence_s = item.at - self._start
                before = session.stats[-1] if session.stats else None
                for chunk in session.speak(item.text, cancel=self.cancel):
                    if self.timing.first_audio_s is None:
                        self.timing.first_audio_s = time.monotonic() - self._start
                    yield chunk
                if self.timing.engine_first_audio_s is None:
                    self.timing.engine_first_audio_s = _engine_first_audio(session.stats, before)
                if self.cancel.is_set():
                    break
                spoken.append(item.text)
                self.timing.sentences += 1
                self._record(spoken, partial=True)
        finally:
            with self._shown:
                self._stop.set()  # the reader hangs up at its next piece, and shows nothing more
                self.talk.on_end()  # the text shown ends before anything else is printed
            self.timing.partial = not complete
            if spoken:
                self._record(spoken, partial=not complete)

    def _next_sentence(self) -> Any:
        while True:
            try:
                return self._sentences.get(timeout=0.05)
            except queue.Empty:
                if self.cancel.is_set():
                    return None

    def _record(self, spoken: list[str], *, partial: bool) -> None:
        session = self.talk.session
        if self.exchange is None:
            self.exchange = session.new_exchange(self.user_text)
        self.exchange = Exchange(self.user_text, " ".join(spoken), partial, self.exchange.seq)
        session.record(self.exchange)


def _engine_first_audio(stats: Any, before: Any) -> float | None:
    """The engine's own time to first audio (s) of the first segment spoken after ``before``."""
    first = None
    for entry in reversed(stats):
        if entry is before:
            break
        first = entry
    return first.first_audio_ms / 1000 if first is not None and first.first_audio_ms is not None else None
