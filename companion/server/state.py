"""What the server holds: settings, metrics, and (once loaded) the engine, history, voices and worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from companion.config import Settings
from companion.errors import CompanionError
from companion.server.metrics import Metrics
from companion.server.worker import SpeechWorker

log = logging.getLogger("companion.serve")


class ServerState:
    def __init__(self, settings: Settings, api_key: str | None, on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.api_key = api_key or None
        self.on_fatal = on_fatal  # called with one line when the model cannot be loaded
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.failure: str | None = None
        self.engine: Any = None
        self.store: Any = None
        self.voices: Any = None
        self.conversations: Any = None
        self.worker: SpeechWorker | None = None

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
                                      max_seq_len=self.settings.context.max_seq_len)
            self.store = Store()
            self.voices = WatchedVoiceStore()
            self.conversations = Conversations(self.engine, self.settings, self.store, self.voices, ReferenceCache(),
                                               s.max_conversations)
        except CompanionError as err:
            self._fail(str(err))
            return
        except Exception as err:  # noqa: BLE001 - one line, and the server stops
            self._fail(f"cannot load the model: {type(err).__name__}: {err}")
            return
        engine = self.engine
        self.worker = SpeechWorker(s.queue_size, self.metrics, lambda: engine.last_stats.first_audio_ms)
        log.info("model %s loaded in %.1f s: ready", m.id, time.monotonic() - start)
        self.ready.set()

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
