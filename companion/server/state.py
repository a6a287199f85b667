"""What the server holds: settings, metrics, and (once loaded) the engine, history, voices and worker."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from companion.config import Settings
from companion.errors import CompanionError
from companion.server.connections import Refusals
from companion.server.keys import ANONYMOUS, Caller, KeyStore
from companion.server.metrics import Metrics
from companion.server.worker import SpeechWorker

log = logging.getLogger("companion.serve")


class ServerState:
    def __init__(self, settings: Settings, api_key: str | None, on_fatal: Callable[[str], None] | None = None,
                 keys: KeyStore | None = None) -> None:
        self.settings = settings
        self.api_key = api_key or None  # COMPANION_API_KEY: one more key, with the namespace ""
        self.keys = keys  # the named keys (keys.yaml), re-read when the file changes
        self.on_fatal = on_fatal  # called with one line when the model cannot be loaded
        self.metrics = Metrics()
        self.refusals = Refusals()  # connections turned away by the protocol (companion/server/connections.py)
        self.ready = threading.Event()
        self.failure: str | None = None
        self.engine: Any = None
        self.store: Any = None
        self.voices: Any = None
        self.conversations: Any = None
        self.worker: SpeechWorker | None = None

    def needs_key(self) -> bool:
        return self.api_key is not None or bool(self.keys is not None and self._named())

    def identify(self, token: str) -> Caller | None:
        """The caller whose key ``token`` is, or None (every comparison in constant time)."""
        found = None
        if self.keys is not None and token:
            try:
                found = self.keys.match(token)
            except CompanionError:  # a broken keys file (logged by needs_key): no named key works
                found = None
        if self.api_key is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
            found = found or ANONYMOUS
        return found

    def _named(self) -> bool:
        try:
            return bool(self.keys.entries()) if self.keys is not None else False
        except CompanionError as err:  # a broken keys file: nobody gets in rather than everybody
            log.error("%s", err)
            return True

    def load(self) -> None:
        """Load the model once, then open the history and start the speech worker (runs in a thread)."""
        from companion.config import resolve_model_path
        from companion.engine import Engine
        from companion.refcache import ReferenceCache
        from companion.server.conversations import Conversations
        from companion.server.profiles import WatchedVoiceStore
        from companion.store import Store

        m, s = self.settings.model, self.settings.serve
        start = time.monotonic()
        try:
            self.engine = Engine.load(resolve_model_path(m.id), revision=m.revision, device=m.device, dtype=m.dtype,
                                      max_seq_len=self.settings.context.max_seq_len,
                                      max_batch=self.settings.engine.max_batch,
                                      compile=self.settings.engine.compile)
            self.store = Store()
            self.voices = WatchedVoiceStore()
            self.conversations = Conversations(self.engine, self.settings, self.store, self.voices, ReferenceCache())
            self.conversations.sweep()
        except CompanionError as err:
            self._fail(str(err))
            return
        except Exception as err:  # noqa: BLE001 - one line, and the server stops
            self._fail(f"cannot load the model: {type(err).__name__}: {err}")
            return
        engine = self.engine
        self.worker = SpeechWorker(s.queue_size, self.metrics, lambda: engine.last_stats.first_audio_ms,
                                   slots=self.settings.engine.max_batch)
        log.info("model %s loaded in %.1f s: ready", m.id, time.monotonic() - start)
        self.ready.set()

    def streams(self) -> tuple[int, int]:
        """(replies spoken together now, the most that can be: ``engine.max_batch``)."""
        return (self.worker.streams if self.worker is not None else 0), self.settings.engine.max_batch

    def _fail(self, message: str) -> None:
        self.failure = message
        log.error("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def close(self) -> None:
        """Cancel what waits or runs, stop the worker, close the history (after uvicorn drained requests)."""
        if self.worker is not None:
            self.worker.stop(timeout=30)
        if self.conversations is not None:
            self.conversations.close()
        if self.store is not None:
            self.store.close()
