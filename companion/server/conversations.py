"""The sessions behind the server's requests (used only from the speech worker's thread).

A request without ``conversation`` is one-shot: a fresh session with only the requested voice's
reference in its prompt (the engine's prefix cache still holds that reference from the last request,
so it is not computed again). A request with ``conversation: ID`` speaks in that conversation: the
same session as its earlier requests (context, pruning, ``$CLEAR$``), recorded in the history
database under the name ID, and resumed from there after a restart or when it was dropped from memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from companion.config import Settings
from companion.engine import Engine
from companion.session import AudioLog, Session
from companion.store import Store


class Conversations:
    def __init__(self, engine: Engine, settings: Settings, store: Store, voices: Any, cache: Any, limit: int) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store
        self.voices = voices  # companion.voices.VoiceStore
        self.cache = cache  # companion.refcache.ReferenceCache
        self.limit = limit
        self._live: OrderedDict[str, Session] = OrderedDict()  # most recently used last

    def speak(self, text: str, voice: str, conversation: str | None, cancel: threading.Event) -> Iterator[np.ndarray]:
        """Audio chunks of ``text`` in ``voice`` (raises before any audio for an unknown voice)."""
        if conversation is None:
            session = Session(self.engine, self.settings, None, self.voices, self.cache)
            try:
                chunks = session.speak(text, voice=voice, cancel=cancel)
            except BaseException:
                session.close()
                raise
            return _then(chunks, session.close)
        session = self._session(conversation)
        return _then(session.speak(text, voice=voice, cancel=cancel), lambda: _forget_audio(session))

    def clear(self, conversation: str) -> bool:
        """``$CLEAR$`` for ``conversation``; False when there is no such conversation."""
        session = self._existing(conversation)
        if session is None:
            return False
        session.clear()
        return True

    def describe(self, conversation: str) -> dict[str, Any] | None:
        """What ``conversation``'s next prompt starts with, or None when there is no such conversation."""
        session = self._existing(conversation)
        if session is None:
            return None
        return {
            "id": conversation,
            "object": "conversation",
            "history_id": session.session_id,
            "voices": list(session.context.voices),
            "turns": [{"seq": t.seq, "voice": t.voice, "text": t.text} for t in session.context.turns],
            "context_positions": session.context_used(),
            "context_budget": session.context_budget(),
        }

    def close(self) -> None:
        for session in self._live.values():
            session.close()
        self._live.clear()

    # ---- sessions -------------------------------------------------------------------------------

    def _existing(self, conversation: str) -> Session | None:
        if conversation in self._live or self.store.conversation_session_id(conversation) is not None:
            return self._session(conversation)
        return None

    def _session(self, conversation: str) -> Session:
        session = self._live.get(conversation)
        if session is not None:
            self._live.move_to_end(conversation)
            return session
        sid = self.store.conversation_session_id(conversation)
        if sid is not None:
            session = Session.resume(self.engine, self.settings, self.store, sid, self.voices, self.cache)
        else:
            session = Session(self.engine, self.settings, self.store, self.voices, self.cache)
            session.session_id = self.store.create_session(
                self.engine.model_key, self.engine.max_seq_len, [], None, conversation=conversation
            )
        self._live[conversation] = session
        while len(self._live) > self.limit:
            _, dropped = self._live.popitem(last=False)
            dropped.close()  # it is in the history: the next request for it resumes it from there
        return session


def _then(chunks: Iterator[np.ndarray], after: Any) -> Iterator[np.ndarray]:
    """``chunks``, then ``after()`` however the iteration ends (completed, stopped early, or failed)."""
    try:
        yield from chunks
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        after()


def _forget_audio(session: Session) -> None:
    """A server's session keeps no whole-conversation recording (it would grow without end)."""
    session.log.close()
    session.log = AudioLog(session.engine.sample_rate)
