"""Line parsing and the position budget (companion.session.script, companion.session.context)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from companion.engine import Engine, Segment
from companion.errors import CompanionError
from companion.session import Context, Part, TextTooLong, Turn, Voice, parse_line, read_script
from companion.session.context import MIN_TEXT_POSITIONS
from companion.session.script import assign_voices, is_clear

KNOWN = ["narrator", "guest"]


@pytest.mark.parametrize(
    ("line", "parts"),
    [
        ("Hello.", [Part(None, "Hello.")]),
        ("guest: Hi there.", [Part("guest", "Hi there.")]),
        ("Note: buy milk.", [Part(None, "Note: buy milk.")]),  # not a voice: stays text
        ("It is 10:30 now.", [Part(None, "It is 10:30 now.")]),
        ("a || b", [Part(None, "a"), Part(None, "b")]),
        ("narrator: a || guest: b || c", [Part("narrator", "a"), Part("guest", "b"), Part(None, "c")]),
        ("  ||  x  || ", [Part(None, "x")]),
    ],
)
def test_parse_line(line: str, parts: list[Part]) -> None:
    assert parse_line(line, KNOWN) == parts


def test_alternation_starts_at_the_active_voice() -> None:
    parts = [Part(None, "a"), Part(None, "b"), Part("narrator", "c"), Part(None, "d")]
    got = assign_voices(parts, ["narrator", "guest"], "guest")
    assert got == [("guest", "a"), ("narrator", "b"), ("narrator", "c"), ("narrator", "d")]
    assert assign_voices([Part(None, "x")], ["narrator", "guest"], "guest") == [("guest", "x")]
    assert assign_voices([Part(None, "x"), Part(None, "y")], [], "solo") == [("solo", "x"), ("solo", "y")]


def test_clear_and_script_lines() -> None:
    assert is_clear("  $CLEAR$ ") and not is_clear("$CLEAR$ now")
    assert read_script("# title\n\nHello.\n  # indented comment\nguest: Hi.\n") == ["Hello.", "guest: Hi."]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(str(tiny_model_dir), max_seq_len=400)


def _codes(frames: int) -> torch.Tensor:
    return torch.zeros(32, frames, dtype=torch.long)


def _turn(engine: Engine, seq: int, frames: int) -> Turn:
    seg = Segment(0, f"turn {seq}", _codes(frames))
    return Turn(seq, "v", 0, seg.text, seg.codes, engine.segment_positions(seg))


def test_fit_drops_the_oldest_turns_exactly_to_the_budget(engine: Engine) -> None:
    ctx = Context(400, engine.segment_positions, prune_to=1.0)  # no slack: just enough
    ctx.pin(Voice("v", 0, "reference words", _codes(100)), reserve=50)
    ref = ctx.reference_positions()
    assert ref == engine.text_positions(0, "reference words") + 101  # text + frames + end frame
    turns = [_turn(engine, i, 20) for i in range(1, 9)]
    for t in turns:
        ctx.append(t)
    text = engine.text_positions(0, "next")
    budget = 400 - 50 - text
    dropped = ctx.fit(50, text)
    assert ctx.used() <= budget
    assert ctx.used() + turns[0].positions > budget or not dropped  # dropped no more than needed
    assert [t.seq for t in dropped] == list(range(1, len(dropped) + 1))  # oldest first
    assert [t.seq for t in ctx.turns] == list(range(len(dropped) + 1, 9))
    assert ctx.segments()[0].text == "reference words"  # the reference stays


def test_an_overflow_prunes_down_to_the_low_water_mark_then_turns_accumulate(engine: Engine) -> None:
    """With slack (prune_to 0.6) one overflow drops a batch of turns, so the next turns fit as they are."""
    ctx = Context(400, engine.segment_positions, prune_to=0.6)
    ctx.pin(Voice("v", 0, "reference words", _codes(100)), reserve=50)
    text = engine.text_positions(0, "next")
    budget = 400 - 50 - text
    room = budget - ctx.reference_positions()  # what turns may use
    seq, prunes, fits_without_prune = 0, 0, 0
    for _ in range(40):
        seq += 1
        dropped = ctx.fit(50, text)
        if dropped:
            prunes += 1
            turns = ctx.used() - ctx.reference_positions()
            assert turns <= int(0.6 * room)  # down to the low-water mark ...
            assert turns + dropped[-1].positions > int(0.6 * room)  # ... and not a turn further
            assert [t.seq for t in ctx.turns] == list(range(dropped[-1].seq + 1, seq))  # oldest went first
        else:
            fits_without_prune += 1
        assert ctx.used() <= budget
        assert ctx.segments()[0].text == "reference words"
        ctx.append(_turn(engine, seq, 20))
    # 20-frame turns (~26 positions) in a room of ~220: a prune every 3-4 turns, never two in a row.
    assert 5 <= prunes <= 14 and fits_without_prune >= 2 * prunes


def test_prune_to_one_prunes_on_every_turn_once_full(engine: Engine) -> None:
    """The old behaviour (prune_to 1.0): once full, every turn drops one turn (and shifts the rest)."""
    ctx = Context(400, engine.segment_positions, prune_to=1.0)
    ctx.pin(Voice("v", 0, "reference words", _codes(100)), reserve=50)
    text = engine.text_positions(0, "next")
    drops = []
    for seq in range(1, 41):
        drops.append(len(ctx.fit(50, text)))
        ctx.append(_turn(engine, seq, 20))
    first = drops.index(1)
    assert drops[first:] == [1] * (40 - first)


def test_a_full_budget_fits_and_one_more_position_prunes(engine: Engine) -> None:
    ctx = Context(400, engine.segment_positions)
    ctx.pin(Voice("v", 0, "ref", _codes(50)), reserve=40)
    t = _turn(engine, 1, 10)
    ctx.append(t)
    exact_text = 400 - 40 - ctx.used()
    assert ctx.fit(40, exact_text) == []  # prompt + reserve == max_seq_len: fits
    assert ctx.fit(40, exact_text + 1) == [t]


def test_references_are_never_dropped(engine: Engine) -> None:
    ctx = Context(400, engine.segment_positions)
    ctx.pin(Voice("v", 0, "ref", _codes(200)), reserve=100)
    with pytest.raises(TextTooLong, match="does not fit the context even with the conversation dropped"):
        ctx.fit(100, 400 - 100 - ctx.reference_positions() + 1)
    assert ctx.reference_positions() > 0


def test_a_reference_too_long_is_refused_when_pinned(engine: Engine) -> None:
    ctx = Context(400, engine.segment_positions)
    with pytest.raises(CompanionError, match=r"at most [\d.]+ s, or raise context.max_seq_len") as err:
        ctx.pin(Voice("big", 0, "ref", _codes(400 - 50 - MIN_TEXT_POSITIONS)), reserve=50)
    seconds = float(str(err.value).split("at most ")[1].split(" s")[0])
    fits = int(seconds * 12.5) - 1  # a reference of the suggested length is accepted
    ctx.pin(Voice("ok", 0, "ref", _codes(fits)), reserve=50)
    assert "big" not in ctx.voices and "ok" in ctx.voices


def test_a_new_voice_unpins_the_earliest_voices_when_both_cannot_fit(engine: Engine) -> None:
    ctx = Context(400, engine.segment_positions)
    assert ctx.pin(Voice("a", 0, "ref", _codes(120)), reserve=50) == []
    assert ctx.pin(Voice("b", 1, "ref", _codes(60)), reserve=50) == []
    ctx.append(_turn(engine, 1, 10))
    assert ctx.pin(Voice("c", 2, "ref", _codes(150)), reserve=50) == ["a"]  # a + b + c do not fit; b + c do
    assert list(ctx.voices) == ["b", "c"] and len(ctx.turns) == 1  # the turns stay
    assert ctx.reference_positions() <= 400 - 50 - MIN_TEXT_POSITIONS


def test_the_report_never_shows_more_used_than_the_budget(engine: Engine) -> None:
    """A reply just kept can push the oldest turns out: /context shows them as dropped, not as used."""
    ctx = Context(400, engine.segment_positions)
    ctx.pin(Voice("v", 0, "ref", _codes(100)), reserve=50)
    for i in range(1, 10):
        ctx.append(_turn(engine, i, 20))
    assert ctx.used() > 400 - 50  # more than the budget until the next reply prunes
    gone = ctx.overflow(50)
    rows = ctx.report(50)
    assert gone > 0 and ctx.in_memory(50) <= 400 - 50
    assert sum(r.positions for r in rows[:-1]) == ctx.in_memory(50)
    assert rows[-2].what == f"{gone} older turn(s): no longer fit, dropped at the next reply"
    assert [r.what.split()[1] for r in rows[1:-2]] == [str(i) for i in range(gone + 1, 10)]
    assert len(ctx.fit(50, 0)) == gone  # what a reply with no text would drop: exactly those
    assert ctx.in_memory(50) == ctx.used()  # after pruning, nothing overflows
