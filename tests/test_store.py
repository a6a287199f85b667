"""SQLite history (companion.store) on real database files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from companion.errors import CompanionError
from companion.paths import get_paths
from companion.store import SCHEMA_VERSION, Store, TurnRecord, VoiceRecord, blob_to_codes, codes_to_blob


def _codes(k: int = 4, t: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (k, t), generator=g)


def test_codes_round_trip_exactly() -> None:
    codes = _codes(8, 33)
    blob, k, t = codes_to_blob(codes)
    assert len(blob) == 2 * 8 * 33
    back = blob_to_codes(blob, k, t)
    assert back.dtype == torch.int64 and torch.equal(back, codes)


def test_new_database_is_at_the_latest_schema_in_wal_mode() -> None:
    with Store() as store:
        assert store.path == get_paths().history_db
        assert store.schema_version == SCHEMA_VERSION >= 1
    db = sqlite3.connect(get_paths().history_db)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sessions", "voices", "turns"} <= tables


def test_session_voices_and_turns_round_trip(tmp_path: Path) -> None:
    ref = _codes(4, 20, seed=1)
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("tiny@abc", 512, [VoiceRecord("narrator", 0, "Hello there.", ref),
                                                      VoiceRecord("plain", 1, None, None)], "narrator")
        seqs = [store.add_turn(sid, TurnRecord("narrator", 0, f"turn {i}", _codes(4, 5 + i, seed=10 + i)), 1)
                for i in range(3)]
        assert seqs == [1, 2, 3]
    with Store(tmp_path / "h.sqlite3") as store:  # reopened: everything is on disk
        voices = store.voices(sid)
        assert [v.name for v in voices] == ["narrator", "plain"]
        assert torch.equal(voices[0].codes, ref) and voices[1].codes is None
        turns = store.turns(sid)
        assert [t.text for t in turns] == ["turn 0", "turn 1", "turn 2"]
        for i, turn in enumerate(turns):
            assert torch.equal(turn.codes, _codes(4, 5 + i, seed=10 + i))
        record = store.session(sid)
        assert record.turn_count == 3 and record.first_text == "turn 0" and record.voice == "narrator"


def test_a_bootstrapped_reference_replaces_the_empty_one_in_place(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [VoiceRecord("a", 0, "x", _codes()), VoiceRecord("b", 1, None, None)], "a")
        store.put_voice(sid, VoiceRecord("b", 1, "now it has one", _codes(seed=5)))
        voices = store.voices(sid)
        assert [v.name for v in voices] == ["a", "b"]
        assert voices[1].transcript == "now it has one" and torch.equal(voices[1].codes, _codes(seed=5))


def test_clear_and_pruning_are_recorded_as_the_context_start(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], None)
        store.add_turn(sid, TurnRecord("a", 0, "one", _codes()), 1)
        store.add_turn(sid, TurnRecord("a", 0, "two", _codes()), 2)  # turn 1 pruned before turn 2
        assert store.session(sid).context_start == 2
        store.set_state(sid, context_start=3)  # $CLEAR$
        assert store.session(sid).context_start == 3
        assert [t.text for t in store.turns(sid, from_seq=2)] == ["two"]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], None)
        with pytest.raises(RuntimeError), store.transaction() as db:
            db.execute("INSERT INTO turns (session_id, seq, created_at, voice, speaker, text, codes, codes_k, codes_t) "
                       "VALUES (?, 1, 'now', 'a', 0, 'half', x'00', 1, 1)", (sid,))
            raise RuntimeError("crash in the middle")
        assert store.turns(sid) == []
        assert store.integrity_check() == "ok"


def test_migrations_run_in_order_from_an_older_version(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    sqlite3.connect(path).close()  # an empty version-0 database
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        sid = store.create_session("m", 64, [], None)
        assert store.latest_session_id() == sid


def test_a_newer_schema_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CompanionError, match="newer companion.*upgrade companion"):
        Store(path)


def test_a_file_that_is_not_a_database_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(CompanionError, match="cannot open the history database.*move the file away") as err:
        Store(path)
    assert "\n" not in str(err.value)


def test_unknown_session_is_a_one_line_error(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as store, pytest.raises(CompanionError, match="no conversation 42.*history list"):
        store.session(42)


def test_an_unpinned_voice_is_removed_and_a_new_one_goes_last(tmp_path: Path) -> None:
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [VoiceRecord("a", 0, "x", _codes()), VoiceRecord("b", 1, "y", _codes())], "a")
        store.remove_voice(sid, "a")
        store.put_voice(sid, VoiceRecord("c", 2, "z", _codes()))
        assert [v.name for v in store.voices(sid)] == ["b", "c"]


def test_a_version_1_history_keeps_its_turns_and_gains_the_typed_text(tmp_path: Path) -> None:
    """A history written before the typed text was kept: its turns read back (typed None), new ones keep both."""
    from companion.store import MIGRATIONS

    path = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    blob, k, t = codes_to_blob(torch.ones(2, 3, dtype=torch.long))
    db.execute("INSERT INTO sessions (created_at, updated_at, model_key, max_seq_len) VALUES ('a', 'a', 'm', 64)")
    db.execute("INSERT INTO turns (session_id, seq, created_at, voice, speaker, text, codes, codes_k, codes_t) "
               "VALUES (1, 1, 'a', 'v', 0, 'ten thirty.', ?, ?, ?)", (blob, k, t))
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        old = store.turns(1)[0]
        assert (old.text, old.typed) == ("ten thirty.", None)
        store.add_turn(1, TurnRecord("v", 0, "ten forty.", torch.ones(2, 3, dtype=torch.long), typed="10:40"), None)
        assert [(r.text, r.typed) for r in store.turns(1)] == [("ten thirty.", None), ("ten forty.", "10:40")]
