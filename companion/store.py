"""Conversation history in SQLite (``paths.history_db``): sessions, their pinned voices, their turns,
and the text exchanged with an LLM.

The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a database from version
``i`` to ``i + 1`` and they run in order, each in its own transaction. The database is in WAL mode
with ``synchronous=FULL``: each completed turn is one transaction, so a crash (even ``kill -9`` in the
middle of a turn) leaves every earlier turn intact and nothing of the unfinished one.

Codes are stored as raw little-endian int16 bytes of the ``(K, T)`` tensor, row-major, with ``K`` and
``T`` in their own columns (Mimi codes are below 2048). No pickle.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from companion.errors import CompanionError
from companion.paths import get_paths

if TYPE_CHECKING:  # torch loads where codes are converted: `companion history list` never needs it
    import torch

MIGRATIONS: list[str] = [
    # 0 -> 1: sessions, the voices pinned in each session, and the turns spoken
    """
    CREATE TABLE sessions (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        model_key     TEXT NOT NULL,
        max_seq_len   INTEGER NOT NULL,
        context_start INTEGER NOT NULL DEFAULT 1,  -- first turn seq still in the context (pruned/cleared before)
        voice         TEXT                          -- the active voice
    );
    CREATE TABLE voices (
        session_id  INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        position    INTEGER NOT NULL,   -- order of the pinned references in the prompt
        name        TEXT NOT NULL,
        speaker     INTEGER NOT NULL,
        transcript  TEXT,
        codes       BLOB,               -- int16 (K, T), NULL for a voice without a reference yet
        codes_k     INTEGER,
        codes_t     INTEGER,
        PRIMARY KEY (session_id, name)
    );
    CREATE TABLE turns (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id     INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq            INTEGER NOT NULL,  -- 1, 2, ... within the session
        kind           TEXT NOT NULL DEFAULT 'turn',  -- or 'reference': a voice's first reply, pinned as its reference
        created_at     TEXT NOT NULL,
        voice          TEXT NOT NULL,
        speaker        INTEGER NOT NULL,
        text           TEXT NOT NULL,
        codes          BLOB NOT NULL,     -- int16 (K, T)
        codes_k        INTEGER NOT NULL,
        codes_t        INTEGER NOT NULL,
        audio_path     TEXT,
        first_audio_ms REAL,
        rtf            REAL,
        UNIQUE (session_id, seq)
    );
    """,
    # 1 -> 2: what the user typed, beside the text that was spoken (numbers, symbols, markup rewritten);
    # NULL in turns recorded before. (No SQL comment here: SQLite splices the column into the table's
    # CREATE text, where a comment would swallow the closing parenthesis.)
    "ALTER TABLE turns ADD COLUMN typed TEXT",
    # 2 -> 3: a conversation name given by a client of `companion serve` (unique when set)
    """
    ALTER TABLE sessions ADD COLUMN conversation TEXT;
    CREATE UNIQUE INDEX sessions_conversation ON sessions (conversation) WHERE conversation IS NOT NULL;
    """,
    # 3 -> 4: the text of conversations with an LLM: the user's line and the reply as spoken
    """
    CREATE TABLE exchanges (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id  INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,             -- 1, 2, ... within the session
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        user_text   TEXT NOT NULL,
        reply       TEXT NOT NULL,                -- the sentences spoken, as the LLM wrote them
        partial     INTEGER NOT NULL DEFAULT 0,   -- 1: cut short (interrupted, or the server failed)
        UNIQUE (session_id, seq)
    );
    -- the first exchange still remembered (those before were cleared by $CLEAR$)
    ALTER TABLE sessions ADD COLUMN exchanges_start INTEGER NOT NULL DEFAULT 1
    """,
    # 4 -> 5: conversation names are unique within a namespace (a `companion serve` API key), not overall
    """
    ALTER TABLE sessions ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
    DROP INDEX sessions_conversation;
    CREATE UNIQUE INDEX sessions_conversation ON sessions (namespace, conversation) WHERE conversation IS NOT NULL
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def codes_to_blob(codes: torch.Tensor) -> tuple[bytes, int, int]:
    """``(K, T)`` integer codes -> (int16 little-endian bytes, K, T)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (K, T), got {tuple(codes.shape)}")
    import torch

    array = codes.detach().to("cpu", torch.int64).numpy()
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int16).max):
        raise ValueError("codes out of int16 range")
    k, t = array.shape
    return array.astype("<i2").tobytes(), int(k), int(t)


def blob_to_codes(blob: bytes, k: int, t: int) -> torch.Tensor:
    """The inverse of ``codes_to_blob``: ``(K, T)`` int64."""
    if len(blob) != 2 * k * t:
        raise CompanionError(f"history database: stored codes have {len(blob)} bytes, expected {2 * k * t}: the file is damaged")
    import torch

    return torch.from_numpy(np.frombuffer(blob, dtype="<i2").astype(np.int64).reshape(k, t).copy())


@dataclass
class VoiceRecord:
    name: str
    speaker: int
    transcript: str | None
    codes: torch.Tensor | None  # (K, T) int64


@dataclass
class TurnRecord:
    voice: str
    speaker: int
    text: str
    codes: torch.Tensor  # (K, T) int64
    kind: str = "turn"  # "reference": pinned as the voice's reference, not replayed as a turn
    seq: int = 0  # assigned by Store.add_turn
    created_at: str = ""
    audio_path: str | None = None
    first_audio_ms: float | None = None
    rtf: float | None = None
    typed: str | None = None  # the line (or part of it) as the user typed it; ``text`` is what was spoken


@dataclass
class Exchange:
    """One exchange with an LLM: the user's line and the reply as spoken (``partial``: cut short)."""

    user: str
    reply: str
    partial: bool = False
    seq: int = 0  # its number in the session (0: not numbered yet)


@dataclass
class SessionRecord:
    id: int
    created_at: str
    updated_at: str
    model_key: str
    max_seq_len: int
    context_start: int
    voice: str | None
    turn_count: int
    first_text: str | None
    conversation: str | None = None  # the name a `companion serve` client gave it


class Store:
    """One connection to the history database. Thread-safe (one lock); use as a context manager."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else get_paths().history_db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise CompanionError(
                f"{self.path}: cannot open the history database ({err}): move the file away to start a new history"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise CompanionError(
                f"{self.path}: written by a newer companion (schema {version}, this one knows {SCHEMA_VERSION}): "
                "upgrade companion, or move the file away to start a new history"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in _statements(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    # sessions -----------------------------------------------------------------------------------

    def create_session(self, model_key: str, max_seq_len: int, voices: list[VoiceRecord], voice: str | None,
                       conversation: str | None = None, namespace: str = "") -> int:
        with self.transaction() as db:
            stamp = now()
            cur = db.execute(
                "INSERT INTO sessions (created_at, updated_at, model_key, max_seq_len, voice, conversation, namespace) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stamp, stamp, model_key, max_seq_len, voice, conversation, namespace),
            )
            session_id = int(cur.lastrowid or 0)
            for v in voices:
                self._put_voice(db, session_id, v)
        return session_id

    def put_voice(self, session_id: int, voice: VoiceRecord, unpinned: Sequence[str] = ()) -> None:
        """Add a voice to the session, or replace its reference (a bootstrapped reference, say); unpin
        the voices ``unpinned`` in the same transaction."""
        with self.transaction() as db:
            self._unpin(db, session_id, unpinned)
            self._put_voice(db, session_id, voice)

    def _unpin(self, db: sqlite3.Connection, session_id: int, names: Sequence[str]) -> None:
        for name in names:
            db.execute("DELETE FROM voices WHERE session_id = ? AND name = ?", (session_id, name))

    def remove_voice(self, session_id: int, name: str) -> None:
        """Unpin a voice (its turns stay)."""
        with self.transaction() as db:
            db.execute("DELETE FROM voices WHERE session_id = ? AND name = ?", (session_id, name))

    def _put_voice(self, db: sqlite3.Connection, session_id: int, v: VoiceRecord) -> None:
        blob, k, t = codes_to_blob(v.codes) if v.codes is not None else (None, None, None)
        row = db.execute("SELECT position FROM voices WHERE session_id = ? AND name = ?", (session_id, v.name)).fetchone()
        if row is None:
            last = db.execute("SELECT MAX(position) FROM voices WHERE session_id = ?", (session_id,)).fetchone()[0]
            position = 0 if last is None else int(last) + 1
        else:
            position = int(row[0])
        db.execute(
            "INSERT OR REPLACE INTO voices (session_id, position, name, speaker, transcript, codes, codes_k, codes_t) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (session_id, position, v.name, v.speaker, v.transcript, blob, k, t),
        )

    def set_state(self, session_id: int, *, context_start: int | None = None, voice: str | None = None,
                  exchanges_start: int | None = None) -> None:
        """Record a ``$CLEAR$`` (``context_start`` = the next turn, ``exchanges_start`` = the next
        exchange) or a change of the active voice."""
        with self.transaction() as db:
            if exchanges_start is not None:
                db.execute("UPDATE sessions SET exchanges_start = ?, updated_at = ? WHERE id = ?",
                           (exchanges_start, now(), session_id))
            if context_start is not None:
                db.execute("UPDATE sessions SET context_start = ?, updated_at = ? WHERE id = ?", (context_start, now(), session_id))
            if voice is not None:
                db.execute("UPDATE sessions SET voice = ?, updated_at = ? WHERE id = ?", (voice, now(), session_id))

    def add_turn(self, session_id: int, turn: TurnRecord, context_start: int | None,
                 voice: VoiceRecord | None = None, unpinned: Sequence[str] = ()) -> int:
        """Store one completed turn and where the context now starts (None: at this turn), in one
        transaction, with the reference of ``voice`` when this turn became it (and the voices it
        ``unpinned``); returns the turn's seq."""
        blob, k, t = codes_to_blob(turn.codes)
        with self.transaction() as db:
            seq = int(db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE session_id = ?", (session_id,)).fetchone()[0])
            stamp = now()
            db.execute(
                "INSERT INTO turns (session_id, seq, kind, created_at, voice, speaker, text, codes, codes_k, codes_t, "
                "audio_path, first_audio_ms, rtf, typed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, seq, turn.kind, stamp, turn.voice, turn.speaker, turn.text, blob, k, t, turn.audio_path,
                 turn.first_audio_ms, turn.rtf, turn.typed),
            )
            db.execute(
                "UPDATE sessions SET updated_at = ?, context_start = ? WHERE id = ?",
                (stamp, seq if context_start is None else context_start, session_id),
            )
            if voice is not None:
                self._unpin(db, session_id, unpinned)
                self._put_voice(db, session_id, voice)
        turn.seq, turn.created_at = seq, stamp
        return seq

    def sessions(self, limit: int | None = None) -> list[SessionRecord]:
        """Sessions, newest first."""
        sql = (
            "SELECT s.id, s.created_at, s.updated_at, s.model_key, s.max_seq_len, s.context_start, s.voice, "
            "(SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id), "
            "(SELECT text FROM turns t WHERE t.session_id = s.id ORDER BY seq LIMIT 1), s.conversation "
            "FROM sessions s ORDER BY s.updated_at DESC, s.id DESC"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return [SessionRecord(*row) for row in rows]

    def session(self, session_id: int) -> SessionRecord:
        for record in self.sessions():
            if record.id == session_id:
                return record
        raise CompanionError(f"no conversation {session_id} in the history: `companion history list` shows the ids")

    def conversation_session_id(self, conversation: str, namespace: str = "") -> int | None:
        """The session a `companion serve` client named ``conversation`` in ``namespace``, or None."""
        with self._lock:
            row = self._db.execute("SELECT id FROM sessions WHERE namespace = ? AND conversation = ?",
                                   (namespace, conversation)).fetchone()
        return int(row[0]) if row else None

    def conversations(self, namespace: str) -> list[tuple[str, int]]:
        """(name, session id) of ``namespace``'s named conversations, least recently used first."""
        with self._lock:
            rows = self._db.execute("SELECT conversation, id FROM sessions WHERE namespace = ? AND conversation IS NOT NULL "
                                    "ORDER BY updated_at, id", (namespace,)).fetchall()
        return [(str(name), int(sid)) for name, sid in rows]

    def idle_conversations(self, before: str) -> list[tuple[str, str, int]]:
        """(namespace, name, session id) of named conversations last used before ``before`` (a ``now()`` stamp)."""
        with self._lock:
            rows = self._db.execute("SELECT namespace, conversation, id FROM sessions WHERE conversation IS NOT NULL "
                                    "AND updated_at < ? ORDER BY updated_at, id", (before,)).fetchall()
        return [(str(ns), str(name), int(sid)) for ns, name, sid in rows]

    def delete_session(self, session_id: int) -> None:
        """Delete a session with its voices, turns and exchanges (one transaction)."""
        with self.transaction() as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def touch(self, session_id: int) -> None:
        """Mark a session as used now (its turns are unchanged)."""
        with self.transaction() as db:
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now(), session_id))

    def latest_session_id(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM sessions ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return int(row[0]) if row else None

    def voices(self, session_id: int) -> list[VoiceRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, speaker, transcript, codes, codes_k, codes_t FROM voices WHERE session_id = ? ORDER BY position",
                (session_id,),
            ).fetchall()
        return [VoiceRecord(n, s, tr, blob_to_codes(b, k, t) if b is not None else None) for n, s, tr, b, k, t in rows]

    def turns(self, session_id: int, from_seq: int = 1) -> list[TurnRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT voice, speaker, text, codes, codes_k, codes_t, kind, seq, created_at, audio_path, first_audio_ms, rtf, "
                "typed "
                "FROM turns WHERE session_id = ? AND seq >= ? ORDER BY seq",
                (session_id, from_seq),
            ).fetchall()
        return [TurnRecord(v, s, tx, blob_to_codes(b, k, t), *rest) for v, s, tx, b, k, t, *rest in rows]

    # exchanges with an LLM ----------------------------------------------------------------------

    def put_exchange(self, session_id: int, exchange: Exchange) -> None:
        """Store ``exchange`` under its seq, or update it (a reply that grows sentence by sentence)."""
        with self.transaction() as db:
            stamp = now()
            db.execute(
                "INSERT INTO exchanges (session_id, seq, created_at, updated_at, user_text, reply, partial) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, seq) DO UPDATE SET "
                "updated_at = excluded.updated_at, reply = excluded.reply, partial = excluded.partial",
                (session_id, exchange.seq, stamp, stamp, exchange.user, exchange.reply, int(exchange.partial)),
            )
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (stamp, session_id))

    def exchanges(self, session_id: int, remembered: bool = False) -> list[Exchange]:
        """The session's exchanges in order; ``remembered``: only those since the last ``$CLEAR$``."""
        sql = "SELECT user_text, reply, partial, seq FROM exchanges WHERE session_id = ?"
        if remembered:
            sql += " AND seq >= (SELECT exchanges_start FROM sessions WHERE id = ?)"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq", (session_id, session_id) if remembered else (session_id,)).fetchall()
        return [Exchange(u, r, bool(p), int(seq)) for u, r, p, seq in rows]

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


def _statements(script: str) -> list[str]:
    """The statements of a migration script (split on ';', comments kept inside statements)."""
    return [s.strip() for s in script.split(";") if s.strip()]
