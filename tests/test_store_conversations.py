"""The history database's named conversations (what `companion serve` keeps), exchanges with an LLM,
listing, deleting and transactions, on a real SQLite file.

Time in the database is ``store.now()``; the tests replace it with a clock that moves one second per
call, so "least recently used" and "idle since" never depend on how fast the machine is.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from companion import store as store_module
from companion.errors import CompanionError
from companion.store import Exchange, Store, TurnRecord, VoiceRecord, codes_to_blob

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every ``now()`` is one second after the last; ``clock[0]`` is how many were taken."""
    ticks = [0]

    def now() -> str:
        ticks[0] += 1
        return (START + timedelta(seconds=ticks[0])).isoformat(timespec="milliseconds")

    monkeypatch.setattr(store_module, "now", now)
    return ticks


def stamp(seconds: int) -> str:
    return (START + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def codes(t: int = 3) -> torch.Tensor:
    return torch.arange(4 * t).view(4, t)


def test_named_conversations_belong_to_their_namespace_least_recently_used_first(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        a = store.create_session("m", 512, [], None, conversation="a", namespace="k1")
        b = store.create_session("m", 512, [], None, conversation="b", namespace="k1")
        other = store.create_session("m", 512, [], None, conversation="a", namespace="k2")  # the same name, another key
        store.create_session("m", 512, [], None)  # a chat session: no name
        assert store.conversation_session_id("a", "k1") == a and store.conversation_session_id("a", "k2") == other
        assert store.conversation_session_id("b", "k2") is None and store.conversation_session_id("a") is None
        assert store.conversations("k1") == [("a", a), ("b", b)]
        store.touch(a)  # used again: now the most recent
        assert store.conversations("k1") == [("b", b), ("a", a)]
        store.add_turn(b, TurnRecord("v", 0, "hi", codes()), None)  # a turn uses it too
        assert store.conversations("k1") == [("a", a), ("b", b)]
        store.put_exchange(a, Exchange("hello", "hi there", seq=1))  # so does an exchange
        assert store.conversations("k1") == [("b", b), ("a", a)]
        assert store.conversations("k2") == [("a", other)] and store.conversations("nobody") == []


def test_the_same_name_twice_in_one_namespace_is_refused(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        store.create_session("m", 512, [], None, conversation="a", namespace="k")
        with pytest.raises(sqlite3.IntegrityError):
            store.create_session("m", 512, [], None, conversation="a", namespace="k")
        assert len(store.sessions()) == 1  # the failed insert left nothing


def test_idle_conversations_are_those_last_used_strictly_before_the_stamp(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        a = store.create_session("m", 512, [], None, conversation="a", namespace="k1")  # used at 1 s
        b = store.create_session("m", 512, [], None, conversation="b", namespace="k2")  # at 2 s
        store.create_session("m", 512, [], None)  # at 3 s, no name: never idle-deleted
        assert store.idle_conversations(stamp(1)) == []  # used exactly then: not before
        assert store.idle_conversations(stamp(2)) == [("k1", "a", a)]
        assert store.idle_conversations(stamp(10)) == [("k1", "a", a), ("k2", "b", b)]
        store.touch(a)  # at 4 s
        assert store.idle_conversations(stamp(4)) == [("k2", "b", b)]


def test_deleting_a_session_takes_its_voices_turns_and_exchanges_and_nothing_else(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        keep, gone = (store.create_session("m", 512, [VoiceRecord("v", 0, "t", codes())], "v") for _ in range(2))
        for sid in (keep, gone):
            store.add_turn(sid, TurnRecord("v", 0, "hi", codes()), None)
            store.put_exchange(sid, Exchange("u", "r", seq=1))
        store.delete_session(gone)
        assert [s.id for s in store.sessions()] == [keep]
        assert store.voices(gone) == [] and store.turns(gone) == [] and store.exchanges(gone) == []
        assert len(store.voices(keep)) == 1 and len(store.turns(keep)) == 1 and len(store.exchanges(keep)) == 1
        assert store.integrity_check() == "ok"


def test_an_exchange_is_updated_in_place_as_its_reply_grows(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], None)
        store.put_exchange(sid, Exchange("Tell me.", "The first", partial=True, seq=1))
        store.put_exchange(sid, Exchange("Tell me.", "The first sentence.", partial=False, seq=1))
        store.put_exchange(sid, Exchange("And?", "Cut", partial=True, seq=2))
        assert store.exchanges(sid) == [Exchange("Tell me.", "The first sentence.", False, 1),
                                        Exchange("And?", "Cut", True, 2)]  # fmt: skip


def test_remembered_exchanges_start_where_the_last_clear_left_them(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], None)
        for seq in (1, 2, 3):
            store.put_exchange(sid, Exchange(f"u{seq}", f"r{seq}", seq=seq))
        assert [e.seq for e in store.exchanges(sid, remembered=True)] == [1, 2, 3]
        store.set_state(sid, exchanges_start=3)
        assert [e.seq for e in store.exchanges(sid, remembered=True)] == [3]
        assert [e.seq for e in store.exchanges(sid)] == [1, 2, 3]  # all of them stay in the history
        other = store.create_session("m", 512, [], None)
        store.put_exchange(other, Exchange("x", "y", seq=1))
        assert [e.user for e in store.exchanges(sid)] == ["u1", "u2", "u3"]  # only its own session's


def test_set_state_changes_only_what_it_is_given(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], "first")
        store.set_state(sid, voice="second")
        record = store.session(sid)
        assert (record.voice, record.context_start, record.updated_at) == ("second", 1, stamp(2))
        store.set_state(sid, context_start=5)
        record = store.session(sid)
        assert (record.voice, record.context_start, record.updated_at) == ("second", 5, stamp(3))
        store.set_state(sid)  # nothing given: nothing changes
        assert store.session(sid) == record


def test_sessions_newest_first_with_a_limit_and_the_latest(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        assert store.latest_session_id() is None and store.sessions() == []
        ids = [store.create_session("m", 512, [], None) for _ in range(4)]
        assert [s.id for s in store.sessions()] == ids[::-1]
        assert [s.id for s in store.sessions(limit=2)] == ids[:1:-1]
        store.add_turn(ids[0], TurnRecord("v", 0, "back again", codes()), None)
        assert store.latest_session_id() == ids[0] and store.sessions(limit=1)[0].first_text == "back again"
        assert store.session(ids[0]).turn_count == 1
        with pytest.raises(CompanionError, match="no conversation 999 in the history: `companion history list`"):
            store.session(999)


def test_turns_from_a_seq_and_a_turn_that_becomes_a_voices_reference(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [VoiceRecord("old", 0, "t", codes()), VoiceRecord("v", 1, None, None)], "v")
        for i in range(1, 4):
            store.add_turn(sid, TurnRecord("v", 1, f"turn {i}", codes(i)), None)
        assert [t.seq for t in store.turns(sid, from_seq=2)] == [2, 3] and store.turns(sid, from_seq=4) == []
        assert [(t.voice, t.speaker) for t in store.turns(sid)] == [("v", 1)] * 3
        assert [(v.name, v.speaker) for v in store.voices(sid)] == [("old", 0), ("v", 1)]
        reference = TurnRecord("v", 1, "my reference", codes(5), kind="reference")
        seq = store.add_turn(sid, reference, context_start=2, voice=VoiceRecord("v", 1, "my reference", codes(5)),
                             unpinned=["old"])  # fmt: skip
        assert seq == 4 and reference.seq == 4 and reference.created_at == stamp(5)
        assert [v.name for v in store.voices(sid)] == ["v"] and store.voices(sid)[0].transcript == "my reference"
        assert store.session(sid).context_start == 2  # as given, not the new turn
        assert store.turns(sid)[-1].kind == "reference"


@pytest.mark.parametrize("fault", [RuntimeError("a bug"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_transaction_interrupted_by_anything_leaves_nothing(tmp_path: Path, clock, fault) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        sid = store.create_session("m", 512, [], None)
        with pytest.raises(type(fault)), store.transaction() as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            raise fault
        assert [s.id for s in store.sessions()] == [sid]
        with store.transaction() as db:  # and the next one works
            db.execute("UPDATE sessions SET voice = 'x' WHERE id = ?", (sid,))
        assert store.session(sid).voice == "x"


def test_a_closed_store_refuses_work_and_its_file_keeps_what_was_written(tmp_path: Path, clock) -> None:  # noqa: ANN001
    path = tmp_path / "h.sqlite3"
    with Store(path) as store:
        sid = store.create_session("m", 512, [], None, conversation="kept")
    with pytest.raises(sqlite3.ProgrammingError):
        store.sessions()
    with Store(path) as again:
        assert again.conversation_session_id("kept") == sid


def test_codes_of_the_wrong_shape_or_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"codes must be \(K, T\), got \(3,\)"):
        codes_to_blob(torch.zeros(3, dtype=torch.long))
    for bad in (-1, 32768):
        with pytest.raises(ValueError) as err:
            codes_to_blob(torch.tensor([[0, bad]]))
        assert str(err.value) == "codes out of int16 range"
    assert codes_to_blob(torch.tensor([[0, 32767]]))[1:] == (1, 2)
    assert codes_to_blob(torch.zeros(4, 0, dtype=torch.long)) == (b"", 4, 0)


def test_the_clock_is_utc_to_the_millisecond() -> None:
    stamp_now = store_module.now()
    parsed = datetime.fromisoformat(stamp_now)
    assert stamp_now.endswith("+00:00") and parsed.utcoffset() == timedelta(0)
    assert len(stamp_now.split(".")[1]) == len("123+00:00")


def test_a_damaged_codes_blob_is_one_line_naming_the_sizes() -> None:
    from companion.store import blob_to_codes

    with pytest.raises(CompanionError) as err:
        blob_to_codes(b"\x00" * 10, 2, 3)
    assert str(err.value) == "history database: stored codes have 10 bytes, expected 12: the file is damaged"


def test_a_history_in_folders_not_made_yet_is_made(tmp_path: Path) -> None:
    with Store(tmp_path / "a" / "b" / "h.sqlite3") as store:
        assert store.sessions() == [] and (tmp_path / "a" / "b" / "h.sqlite3").exists()


def test_the_store_is_used_from_other_threads(tmp_path: Path, clock) -> None:  # noqa: ANN001
    """The server's worker threads write where the event loop's thread opened it."""
    import threading

    with Store(tmp_path / "h.sqlite3") as store:
        made: list[int] = []
        thread = threading.Thread(target=lambda: made.append(store.create_session("m", 512, [], None, "t")))
        thread.start()
        thread.join()
        assert store.conversation_session_id("t") == made[0]


def test_replacing_a_voice_keeps_its_place_and_unpinning_takes_others_in_one_step(tmp_path: Path, clock) -> None:  # noqa: ANN001
    with Store(tmp_path / "h.sqlite3") as store:
        # Names out of alphabetical order, so that only the stored position can give this order.
        sid = store.create_session("m", 512, [VoiceRecord(n, i, None, None) for i, n in enumerate("cab")], "c")
        store.put_voice(sid, VoiceRecord("c", 0, "now with a reference", codes()))
        assert [v.name for v in store.voices(sid)] == ["c", "a", "b"]
        assert store.voices(sid)[0].transcript == "now with a reference"
        store.put_voice(sid, VoiceRecord("a", 1, "replaced too", None))
        assert [v.name for v in store.voices(sid)] == ["c", "a", "b"]
        store.put_voice(sid, VoiceRecord("d", 3, None, None), unpinned=["b"])
        assert [v.name for v in store.voices(sid)] == ["c", "a", "d"]
        store.remove_voice(sid, "c")
        store.put_voice(sid, VoiceRecord("0", 4, None, None))
        assert [v.name for v in store.voices(sid)] == ["a", "d", "0"]


def test_a_newer_history_is_refused_with_the_whole_fix(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CompanionError) as err:
        Store(path)
    assert str(err.value) == (
        f"{path}: written by a newer companion (schema {store_module.SCHEMA_VERSION + 1}, this one knows "
        f"{store_module.SCHEMA_VERSION}): upgrade companion, or move the file away to start a new history")
