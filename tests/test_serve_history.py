"""The history's conversation names (`companion serve`): the migration from a database written before them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from companion.store import MIGRATIONS, SCHEMA_VERSION, Store, TurnRecord, _statements


def test_a_history_from_before_conversation_names_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO sessions (created_at, updated_at, model_key, max_seq_len) VALUES ('t', 't', 'm', 1024)")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 5
        old = store.session(1)
        assert old.conversation is None and old.model_key == "m"
        sid = store.create_session("m", 1024, [], None, conversation="kitchen")
        store.add_turn(sid, TurnRecord("default", 0, "Hi.", torch.zeros(32, 3, dtype=torch.long)), None)
        assert store.conversation_session_id("kitchen") == sid
        assert store.session(sid).conversation == "kitchen" and store.session(sid).turn_count == 1
        assert store.conversation_session_id("nobody") is None
        with pytest.raises(sqlite3.IntegrityError):  # one session per conversation name
            store.create_session("m", 1024, [], None, conversation="kitchen")
        store.create_session("m", 1024, [], None)  # unnamed sessions are not limited
        store.create_session("m", 1024, [], None)
        # A name is unique within a namespace (an API key's): another namespace has its own "kitchen".
        other = store.create_session("m", 1024, [], None, conversation="kitchen", namespace="k1")
        assert store.conversation_session_id("kitchen", "k1") == other != sid
        assert store.conversation_session_id("kitchen") == sid
        assert store.conversations("k1") == [("kitchen", other)]
        store.delete_session(other)
        assert store.conversation_session_id("kitchen", "k1") is None and store.conversations("k1") == []
        assert store.conversation_session_id("kitchen") == sid
