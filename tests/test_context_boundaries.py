"""The position budget at its edges (companion.session.context): exactly at the budget, exactly at the
low-water mark, exactly at the room a reference may take, and one position past each.

Positions are counted by a stand-in for the engine's tokenizer (one position per frame), so every figure
here is exact: each test lands on a limit on purpose, which is where an off-by-one hides.
"""

from __future__ import annotations

import pytest
import torch

from companion.engine import Segment
from companion.errors import CompanionError
from companion.session import Context, ContextRow, TextTooLong, Turn, Voice
from companion.session.context import MIN_TEXT_POSITIONS


def frames(seg: Segment) -> int:
    """One position per frame (the engine adds text and an end frame; the Context logic is the same)."""
    return int(seg.codes.shape[-1])


def codes(n: int) -> torch.Tensor:
    return torch.zeros(32, n, dtype=torch.long)


def turn(seq: int, positions: int) -> Turn:
    return Turn(seq, "v", 0, f"turn {seq}", codes(positions), positions)


def context(turns: int, *, turn_positions: int = 50, prune_to: float = 0.5) -> Context:
    """1000 positions: a 100-position reference, then ``turns`` turns of ``turn_positions`` each."""
    ctx = Context(1000, frames, prune_to=prune_to)
    ctx.pin(Voice("v", 0, "ref", codes(100)), reserve=0)
    for seq in range(1, turns + 1):
        ctx.append(turn(seq, turn_positions))
    return ctx


def test_exactly_at_the_budget_nothing_is_dropped() -> None:
    ctx = context(18)  # 100 + 18 * 50 == 1000
    assert ctx.used() == 1000
    assert ctx.overflow(0) == 0 and ctx.in_memory(0) == 1000
    assert ctx.fit(0, 0) == [] and len(ctx.turns) == 18


def test_a_prune_stops_exactly_at_the_low_water_mark() -> None:
    """1050 positions in a budget of 1000: down to 100 + 0.5 * 900 = 550, i.e. exactly 10 turns, not 11."""
    ctx = context(19)
    assert ctx.used() == 1050 and ctx.low_water(1000) == 550
    assert ctx.overflow(0) == 10 and ctx.in_memory(0) == 550  # what the report announces ...
    dropped = ctx.fit(0, 0)
    assert [t.seq for t in dropped] == list(range(1, 11))  # ... is what the prune does
    assert ctx.used() == 550 and [t.seq for t in ctx.turns] == list(range(11, 20))


def test_one_position_above_the_low_water_mark_drops_one_more_turn() -> None:
    ctx = context(0)
    for seq, positions in enumerate([50] * 18 + [51], start=1):  # 1051: 10 turns gone leave 551 > 550
        ctx.append(turn(seq, positions))
    assert ctx.overflow(0) == 11
    assert [t.seq for t in ctx.fit(0, 0)] == list(range(1, 12)) and ctx.used() == 501


def test_the_text_and_the_reserve_count_against_the_budget() -> None:
    """Budget 1000 - reserve - text: the same turns fit, or prune to the low-water mark of that budget."""
    ctx = context(17)  # 950
    assert ctx.fit(30, 20) == []  # 950 + 30 + 20 == 1000
    assert ctx.budget(30, 21) == 949 and ctx.low_water(949) == 100 + int(0.5 * 849)
    dropped = ctx.fit(30, 21)  # one position over: down to 524, so 9 turns of 50 go (950 - 450 = 500)
    assert len(dropped) == 9 and ctx.used() == 500


def test_the_low_water_mark_is_the_references_plus_a_share_of_what_turns_may_use() -> None:
    ctx = context(0, prune_to=0.6)
    assert ctx.low_water(1000) == 100 + 540
    assert ctx.low_water(99) == 100  # the references alone over the budget: no share is negative
    ctx.prune_to = 1.0
    assert ctx.low_water(1000) == 1000


def test_a_reference_exactly_the_size_of_the_room_is_accepted_one_more_is_refused() -> None:
    room = 1000 - 40 - MIN_TEXT_POSITIONS
    ctx = Context(1000, frames)
    assert ctx.pin(Voice("exact", 0, "ref", codes(room)), reserve=40) == []
    with pytest.raises(CompanionError, match="does not fit the context"):
        ctx.pin(Voice("over", 0, "ref", codes(room + 1)), reserve=40)
    assert list(ctx.voices) == ["exact"]  # the refusal changed nothing


def test_voices_that_fill_the_room_exactly_stay_pinned_together() -> None:
    room = 1000 - 40 - MIN_TEXT_POSITIONS
    ctx = Context(1000, frames)
    ctx.pin(Voice("a", 0, "ref", codes(room - 300)), reserve=40)
    ctx.pin(Voice("b", 1, "ref", codes(200)), reserve=40)
    assert ctx.pin(Voice("c", 2, "ref", codes(100)), reserve=40) == []  # a + b + c == room
    assert ctx.pin(Voice("d", 3, "ref", codes(1)), reserve=40) == ["a"]  # one past it: the earliest goes
    assert list(ctx.voices) == ["b", "c", "d"] and ctx.reference_positions() == 301
    # replacing a voice's reference counts the new one instead of the old, not beside it
    assert ctx.pin(Voice("b", 1, "ref", codes(room - 101)), reserve=40) == []
    assert ctx.reference_positions() == room


def test_references_exactly_at_the_budget_fit_one_position_more_is_too_long() -> None:
    ctx = context(3)
    with pytest.raises(TextTooLong):
        ctx.fit(0, 901)  # 100 + 901 > 1000
    assert len(ctx.turns) == 3  # a refusal drops nothing
    assert [t.seq for t in ctx.fit(0, 900)] == [1, 2, 3]  # 100 + 900 == 1000: fits, with every turn gone
    assert ctx.used() == 100


def test_the_report_counts_the_turns_it_will_drop_at_the_mark() -> None:
    ctx = context(19)
    rows = ctx.report(0)
    assert rows[0].positions == 100 and rows[0].pinned
    assert [r.what.split()[1] for r in rows[1:-2]] == [str(i) for i in range(11, 20)]
    assert rows[-2].what == "10 older turn(s): no longer fit, dropped at the next reply"
    assert rows[-1].positions == 0 and rows[-1].what == "reserved for the next reply"


def test_the_report_names_every_row_exactly_and_pins_only_references() -> None:
    """Lengths in seconds at 12.5 frames/s; a text of 40 characters is shown whole, one of 41 is cut."""
    ctx = Context(1000, frames)
    ctx.pin(Voice("guest", 0, "ref", codes(25)), reserve=0)
    ctx.append(Turn(1, "guest", 0, "z" * 40, codes(50), 50))
    ctx.append(Turn(2, "host", 1, "x" * 40 + "y", codes(5), 5))
    assert ctx.report(30) == [
        ContextRow("reference guest (2.0 s)", 25, True),
        ContextRow(f"turn 1 guest: {'z' * 40} (4.0 s)", 50, False),
        ContextRow(f"turn 2 host: {'x' * 39}\u2026 (0.4 s)", 5, False),
        ContextRow("reserved for the next reply", 30, False),
    ]
    assert ctx.report(921) == [  # 1 position over: down to 25 + int(0.6 * 54) = 57, so turn 1 goes
        ContextRow("reference guest (2.0 s)", 25, True),
        ContextRow(f"turn 2 host: {'x' * 39}\u2026 (0.4 s)", 5, False),
        ContextRow("1 older turn(s): no longer fit, dropped at the next reply", 0, False),
        ContextRow("reserved for the next reply", 921, False),
    ]


def test_the_prompt_is_the_references_then_the_turns_oldest_first() -> None:
    ctx = context(0)
    assert ctx.first_seq() is None
    ctx.pin(Voice("host", 1, "host words", codes(7)), reserve=0)
    ctx.append(Turn(4, "v", 0, "first", codes(3), 3))
    ctx.append(Turn(5, "host", 1, "second", codes(2), 2))
    got = [(s.speaker, s.text, tuple(s.codes.shape)) for s in ctx.segments()]
    assert got == [(0, "ref", (32, 100)), (1, "host words", (32, 7)), (0, "first", (32, 3)), (1, "second", (32, 2))]
    assert ctx.first_seq() == 4


def test_a_voice_without_a_transcript_has_no_reference_and_costs_nothing() -> None:
    ctx = Context(1000, frames)
    assert ctx.pin(Voice("new", 0, None, codes(10)), reserve=0) == []
    assert ctx.voices["new"].positions == 0 and ctx.references() == [] and ctx.reference_positions() == 0
    ctx.pin(Voice("bare", 1, "words", None), reserve=0)
    assert ctx.voices["bare"].positions == 0 and ctx.references() == []


def test_a_refused_reference_says_how_long_it_is_and_what_fits() -> None:
    room = 1000 - 40 - MIN_TEXT_POSITIONS
    ctx = Context(1000, frames)
    with pytest.raises(CompanionError) as err:
        ctx.pin(Voice("big", 0, "ref", codes(room + 25)), reserve=40)
    assert f"its reference ({(room + 25) / 12.5:.1f} s, {room + 25} positions)" in str(err.value)
    assert f"does not fit the context (1000 positions, {room} left after the reply's frames)" in str(err.value)


def test_text_too_long_says_what_it_needed_and_what_there_is() -> None:
    ctx = context(2)
    with pytest.raises(TextTooLong) as err:
        ctx.fit(30, 901)
    assert (err.value.needed, err.value.available) == (100 + 901 + 30, 1000)
    assert "(1031 positions needed, 1000 available)" in str(err.value)


def test_prune_to_one_keeps_a_share_of_nothing_when_the_references_fill_the_budget() -> None:
    ctx = context(0, prune_to=1.0)
    assert ctx.low_water(99) == 100 and ctx.low_water(100) == 100 and ctx.low_water(101) == 101
