"""The sessions behind the server's requests (used from the speech worker's threads).

A request without ``conversation`` is one-shot: a fresh session with only the requested voice's
reference in its prompt (the engine's prefix cache still holds that reference from the last request,
so it is not computed again). A request with ``conversation: ID`` speaks in that conversation: the
same session as its earlier requests (context, pruning, ``$CLEAR$``), recorded in the history
database under the name ID, and resumed from there after a restart or when it was dropped from memory.

Conversations belong to a namespace (the API key's, companion/server/keys.py): the same ID under two
keys is two conversations. Each namespace holds at most ``serve.max_conversations`` (making one more
deletes the one unused longest), and a conversation unused for ``serve.conversation_days`` is deleted.
Of a reply in a conversation, a segment is kept only once ``delivered()`` says its audio was all sent.

Threads: the speech worker runs one job of a conversation at a time, so a session is driven by one
thread at a time; replies of other conversations run beside it. What they share here (the sessions in
memory, most recently used last; sweeping and deleting) is behind one lock, and a conversation in use
(a reply or an edit under way) is never dropped from memory nor deleted: the limits are applied to the
others, and again when it is done.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from companion.config import Settings
from companion.engine import Engine
from companion.session import AudioLog, Session, resume_session
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
        self._in_use: Counter[Key] = Counter()  # replies and edits under way, by conversation
        self._lock = threading.RLock()  # _live, _in_use, sweeping, creating and deleting
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
            return _Then(chunks, session.close)
        key = (namespace, conversation)
        with self._lock:
            session = self._claim(key)
        session.delivered = delivered
        try:
            chunks = session.speak(text, voice=voice, cancel=cancel)
        except BaseException:
            self._release(key, session)
            raise
        return _Then(chunks, lambda: self._release(key, session))

    def clear(self, conversation: str, namespace: str = "") -> bool:
        """``$CLEAR$`` for ``conversation``; False when there is no such conversation."""
        with self._existing((namespace, conversation)) as session:
            if session is None:
                return False
            session.clear()
            return True

    def describe(self, conversation: str, namespace: str = "") -> dict[str, Any] | None:
        """What ``conversation``'s next prompt starts with, or None when there is no such conversation."""
        with self._existing((namespace, conversation)) as session:
            if session is None:
                return None
            return self._description(conversation, session)

    def _description(self, conversation: str, session: Session) -> dict[str, Any]:
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
        with self._lock:
            for session in self._live.values():
                session.close()
            self._live.clear()

    # ---- sessions -------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete the conversations unused for ``serve.conversation_days``; returns how many."""
        with self._lock:
            self._swept = time.monotonic()
            days = self.settings.serve.conversation_days
            before = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
            idle = self.store.idle_conversations(before)
            return sum(self._delete((namespace, name), sid) for namespace, name, sid in idle)

    def _delete(self, key: Key, session_id: int) -> bool:
        """Delete a conversation from memory and history; not one in use (False)."""
        if self._in_use[key]:
            return False
        session = self._live.pop(key, None)
        if session is not None:
            session.close()
        self.store.delete_session(session_id)
        return True

    @contextmanager
    def _existing(self, key: Key) -> Iterator[Session | None]:
        """The conversation ``key``, in use for the block, or None when there is no such conversation."""
        with self._lock:
            if key not in self._live and self.store.conversation_session_id(key[1], key[0]) is None:
                session = None
            else:
                session = self._claim(key)
        if session is None:
            yield None
            return
        try:
            if session.session_id is not None:
                self.store.touch(session.session_id)  # read or cleared: it is in use
            yield session
        finally:
            self._release(key, None)

    def _release(self, key: Key, session: Session | None) -> None:
        """A reply (``session``'s) or an edit is done: the limits apply to its conversation again."""
        if session is not None:
            _done(session)
        with self._lock:
            self._in_use[key] -= 1
            if self._in_use[key] <= 0:
                del self._in_use[key]
            self._trim()

    def _trim(self) -> None:
        """Drop the sessions unused longest (not those in use) until at most ``live_conversations`` are left."""
        idle = [k for k in self._live if not self._in_use[k]]
        for key in idle[: max(0, len(self._live) - self.limit)]:
            self._live.pop(key).close()  # it is in the history: the next request for it resumes it from there

    def _claim(self, key: Key) -> Session:
        """(Under the lock.) The session of ``key``, in use until ``_release`` (so the limits, applied
        now to the others, never drop or delete it)."""
        session = self._session(key)
        self._in_use[key] += 1
        self._trim()
        return session

    def _session(self, key: Key) -> Session:
        """(Under the lock.) The session of ``key``: in memory, resumed from the history, or new (making
        room for it in the history: the key's conversation unused longest, not in use, is deleted)."""
        if time.monotonic() - self._swept > SWEEP_SECONDS:
            self.sweep()
        session = self._live.get(key)
        if session is not None:
            self._live.move_to_end(key)
            return session
        namespace, conversation = key
        sid = self.store.conversation_session_id(conversation, namespace)
        if sid is not None:
            session = resume_session(self.engine, self.settings, self.store, sid, self.voices, self.cache)
        else:
            owned = self.store.conversations(namespace)  # least recently used first
            excess = len(owned) - self.settings.serve.max_conversations + 1
            for name, old in owned:
                if excess <= 0:
                    break
                excess -= self._delete((namespace, name), old)
            session = Session(self.engine, self.settings, self.store, self.voices, self.cache)
            session.session_id = self.store.create_session(
                self.engine.model_key, self.engine.max_seq_len, [], None, conversation=conversation, namespace=namespace
            )
        self._live[key] = session
        return session


class _Then:
    """``chunks``, then ``after()`` once, however the iteration ends: completed, failed, stopped early,
    or closed (or dropped) before it started, which a generator's ``finally`` would not see."""

    def __init__(self, chunks: Iterator[np.ndarray], after: Callable[[], object]) -> None:
        self._chunks = chunks
        self._after: Callable[[], object] | None = after

    def __iter__(self) -> _Then:
        return self

    def __next__(self) -> np.ndarray:
        if self._after is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        after, self._after = self._after, None
        if after is None:
            return
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            after()

    def __del__(self) -> None:
        self.close()


def _done(session: Session) -> None:
    """After a reply: no delivery check left behind, and no whole-conversation recording (it would grow
    without end)."""
    session.delivered = None
    session.log.close()
    session.log = AudioLog(session.engine.sample_rate)
