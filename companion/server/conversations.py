"""The sessions behind the server's requests (used only from the speech worker's thread).

A request without ``conversation`` is one-shot: a fresh session with only the requested voice's
reference in its prompt (the engine's prefix cache still holds that reference from the last request,
so it is not computed again). A request with ``conversation: ID`` speaks in that conversation: the
same session as its earlier requests (context, pruning, ``$CLEAR$``), recorded in the history
database under the name ID, and resumed from there after a restart or when it was dropped from memory.

Conversations belong to a namespace (the API key's, companion/server/keys.py): the same ID under two
keys is two conversations. Each namespace holds at most ``serve.max_conversations`` (making one more
deletes the one unused longest), and a conversation unused for ``serve.conversation_days`` is deleted.
Of a reply in a conversation, a segment is kept only once ``delivered()`` says its audio was all sent.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from companion.config import Settings
from companion.engine import Engine
from companion.session import AudioLog, Session
from companion.store import Store

SWEEP_SECONDS = 3600.0  # how often idle conversations are looked for (and once at start)
Key = tuple[str, str]  # (namespace, conversation)


class Conversations:
    def __init__(self, engine: Engine, settings: Settings, store: Store, voices: Any, cache: Any) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store
        self.voices = voices  # companion.voices.VoiceStore
        self.cache = cache  # companion.refcache.ReferenceCache
        self.limit = settings.serve.live_conversations
        self._live: OrderedDict[Key, Session] = OrderedDict()  # most recently used last
        self._swept = 0.0

    def speak(self, text: str, voice: str, conversation: str | None, cancel: threading.Event, namespace: str = "",
              delivered: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
        """Audio chunks of ``text`` in ``voice`` (raises before any audio for an unknown voice).

        In a conversation, a finished segment is kept only when ``delivered()`` (called on this thread
        once the segment is generated) returns True."""
        if conversation is None:
            session = Session(self.engine, self.settings, None, self.voices, self.cache)
            try:
                chunks = session.speak(text, voice=voice, cancel=cancel)
            except BaseException:
                session.close()
                raise
            return _then(chunks, session.close)
        session = self._session((namespace, conversation))
        session.delivered = delivered
        try:
            chunks = session.speak(text, voice=voice, cancel=cancel)
        except BaseException:
            _done(session)
            raise
        return _then(chunks, lambda: _done(session))

    def clear(self, conversation: str, namespace: str = "") -> bool:
        """``$CLEAR$`` for ``conversation``; False when there is no such conversation."""
        session = self._existing((namespace, conversation))
        if session is None:
            return False
        session.clear()
        return True

    def describe(self, conversation: str, namespace: str = "") -> dict[str, Any] | None:
        """What ``conversation``'s next prompt starts with, or None when there is no such conversation."""
        session = self._existing((namespace, conversation))
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

    def sweep(self) -> int:
        """Delete the conversations unused for ``serve.conversation_days``; returns how many."""
        self._swept = time.monotonic()
        days = self.settings.serve.conversation_days
        before = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
        idle = self.store.idle_conversations(before)
        for namespace, name, sid in idle:
            self._delete((namespace, name), sid)
        return len(idle)

    def _delete(self, key: Key, session_id: int) -> None:
        session = self._live.pop(key, None)
        if session is not None:
            session.close()
        self.store.delete_session(session_id)

    def _existing(self, key: Key) -> Session | None:
        if key in self._live or self.store.conversation_session_id(key[1], key[0]) is not None:
            session = self._session(key)
            if session.session_id is not None:
                self.store.touch(session.session_id)  # read or cleared: it is in use
            return session
        return None

    def _session(self, key: Key) -> Session:
        if time.monotonic() - self._swept > SWEEP_SECONDS:
            self.sweep()
        session = self._live.get(key)
        if session is not None:
            self._live.move_to_end(key)
            return session
        namespace, conversation = key
        sid = self.store.conversation_session_id(conversation, namespace)
        if sid is not None:
            session = Session.resume(self.engine, self.settings, self.store, sid, self.voices, self.cache)
        else:
            owned = self.store.conversations(namespace)  # least recently used first
            for name, old in owned[: max(0, len(owned) - self.settings.serve.max_conversations + 1)]:
                self._delete((namespace, name), old)
            session = Session(self.engine, self.settings, self.store, self.voices, self.cache)
            session.session_id = self.store.create_session(
                self.engine.model_key, self.engine.max_seq_len, [], None, conversation=conversation, namespace=namespace
            )
        self._live[key] = session
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


def _done(session: Session) -> None:
    """After a reply: no delivery check left behind, and no whole-conversation recording (it would grow
    without end)."""
    session.delivered = None
    session.log.close()
    session.log = AudioLog(session.engine.sample_rate)
