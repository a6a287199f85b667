"""tools/mutate.py's rule for equivalent mutants: only a change of letter case in SQL text counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("mutate", Path(__file__).resolve().parents[1] / "tools" / "mutate.py")
assert spec is not None and spec.loader is not None
mutate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutate)


@pytest.mark.parametrize(
    ("removed", "added", "equivalent"),
    [
        ('db.execute("INSERT INTO sessions (a) VALUES (?)", (x,))', 'db.execute("insert into sessions (a) values (?)", (x,))', True),
        ('db.execute("PRAGMA foreign_keys = ON")', 'db.execute("PRAGMA FOREIGN_KEYS = ON")', True),
        ('raise ValueError("codes out of int16 range")', 'raise ValueError("CODES OUT OF INT16 RANGE")', False),
        ('x = "SELECT a" if b else "c"', 'x = "SELECT a" if b else "C"', False),
        ('db.execute("SELECT a FROM t", (1,))', 'db.execute("SELECT a FROM t", (2,))', False),
        ('db.execute("SELECT a FROM t WHERE b = \'x\'")', 'db.execute("SELECT a FROM t WHERE b = \'X\'")', False),
        ('db.execute("SELECT a FROM t WHERE b = \'x\'")', 'db.execute("select a from t where b = \'x\'")', True),
    ],
)  # fmt: skip
def test_only_sql_letter_case_is_equivalent(removed: str, added: str, equivalent: bool) -> None:
    assert mutate.sql_case_only([removed], [added]) is equivalent
    assert mutate.sql_case_only([removed, removed], [added, added]) is False  # one line changed, no more
