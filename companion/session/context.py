"""The conversation memory: pinned voice references, the turns since, and the exact position budget.

A prompt is ``[reference of each voice ...] + [turns, oldest first] + the text to speak``. Its cost is
counted in model positions with the engine's own tokenizer and frame counts (``segment_positions``):

    budget = max_seq_len - reserve (frames the next segment may generate) - positions of the new text

When references + turns exceed the budget before a segment, the oldest turns are dropped with slack:
down to ``prune_to`` of what turns may use (``budget - references``), not just below the budget. Every
turn dropped shifts the positions of all turns after it, so the engine must prefill them again; dropping
a batch at once makes that full re-prefill happen once every several turns instead of every turn.
References are never dropped: a reference that cannot fit is refused when its voice is added.

Every change is planned first and applied only when the work it serves has succeeded: ``plan_fit`` and
``plan_pin`` change nothing; the session speaks with the planned context and, once the segment is kept
(and stored), applies the plan with ``drop`` / ``pin``. ``version`` counts the changes, so a segment that
finishes after the conversation changed under it (a ``$CLEAR$`` while it was abandoned, say) is not kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from companion.engine import Segment
from companion.errors import CompanionError
from companion.refbudget import MIN_TEXT_POSITIONS, ReferenceCost

__all__ = ["MIN_TEXT_POSITIONS", "Context", "ContextRow", "TextTooLong", "Turn", "Voice"]
# When the context overflows, turns are pruned down to this share of what they may use (config
# ``context.prune_to``; 1.0 prunes just enough, as before: a full re-prefill on every later turn).
DEFAULT_PRUNE_TO = 0.6


@dataclass
class Voice:
    """A voice in the session; ``codes`` is its pinned reference, None until it has one."""

    name: str
    speaker: int
    transcript: str | None
    codes: torch.Tensor | None  # (K, T) int64
    generation: dict[str, Any] = field(default_factory=dict)  # per-voice temperature/topk/seed
    profile: Any = None  # the VoiceProfile it came from (to save a bootstrapped reference)
    positions: int = 0  # positions of its reference segment (0 without one)

    def segment(self) -> Segment | None:
        if self.codes is None or self.transcript is None:
            return None
        return Segment(self.speaker, self.transcript, self.codes)


@dataclass
class Turn:
    """One spoken segment kept in the context."""

    seq: int  # its number in the session's history
    voice: str
    speaker: int
    text: str
    codes: torch.Tensor  # (K, T) int64
    positions: int

    def segment(self) -> Segment:
        return Segment(self.speaker, self.text, self.codes)


@dataclass(frozen=True)
class ContextRow:
    """One line of the context report."""

    what: str
    positions: int
    pinned: bool


class Context:
    """Voices (with their pinned references) and turns, measured in positions."""

    def __init__(self, max_seq_len: int, positions: Callable[[Segment], int], frame_rate: float = 12.5,
                 prune_to: float = DEFAULT_PRUNE_TO) -> None:
        self.max_seq_len = max_seq_len
        self.prune_to = prune_to
        self.positions = positions
        self.frame_rate = frame_rate
        self.voices: dict[str, Voice] = {}
        self.turns: deque[Turn] = deque()
        self.version = 0  # +1 on every change of voices or turns

    # ---- voices ---------------------------------------------------------------------------------

    def pin(self, voice: Voice, reserve: int) -> list[str]:
        """Add or replace ``voice``. When its reference does not fit beside the other voices' the
        voices loaded earliest are unpinned (their turns stay, as turns); a reference that cannot fit
        even alone is refused. Returns the names of the voices unpinned."""
        evicted = self.plan_pin(voice, reserve)
        voice.positions = self._reference_positions(voice)
        for name in evicted:
            del self.voices[name]
        self.voices[voice.name] = voice
        self.version += 1
        return evicted

    def plan_pin(self, voice: Voice, reserve: int) -> list[str]:
        """The voices ``pin(voice, reserve)`` would unpin (refused as ``pin`` refuses); changes nothing."""
        positions = self._reference_positions(voice)
        room = self.max_seq_len - reserve - MIN_TEXT_POSITIONS
        if positions > room:
            raise CompanionError(self._refusal(voice, positions, room))
        others = [n for n in self.voices if n != voice.name]
        evicted = []
        while positions + sum(self.voices[n].positions for n in others) > room:
            evicted.append(others.pop(0))
        return evicted

    def _reference_positions(self, voice: Voice) -> int:
        seg = voice.segment()
        return self.positions(seg) if seg is not None else 0

    def _refusal(self, voice: Voice, positions: int, room: int) -> str:
        """The refusal ``voice add`` gives for the same reference (one message, companion.refbudget)."""
        assert voice.codes is not None
        frames = int(voice.codes.shape[-1])
        reserve = self.max_seq_len - MIN_TEXT_POSITIONS - room
        cost = ReferenceCost(frames, positions - frames - 1, self.max_seq_len, reserve, self.frame_rate, True)
        return cost.refusal(voice.name)

    def references(self) -> list[Segment]:
        return [seg for v in self.voices.values() if (seg := v.segment()) is not None]

    def reference_positions(self) -> int:
        return sum(v.positions for v in self.voices.values())

    # ---- turns ----------------------------------------------------------------------------------

    def append(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.version += 1

    def clear(self) -> None:
        """Forget the conversation; the voices and their references stay."""
        self.turns.clear()
        self.version += 1

    def drop(self, turns: list[Turn]) -> None:
        """Drop ``turns``, the oldest ones as ``plan_fit`` returned them."""
        for turn in turns:
            assert self.turns and self.turns[0] is turn, "drop() takes the oldest turns, in order"
            self.turns.popleft()
        if turns:
            self.version += 1

    def used(self) -> int:
        """Positions of references + turns (what the next prompt holds before its text)."""
        return self.reference_positions() + sum(t.positions for t in self.turns)

    def overflow(self, reserve: int) -> int:
        """How many of the oldest turns the next reply drops whatever its text: when references + turns
        no longer fit beside the ``reserve`` frames (a reply just kept may push them out), the oldest go
        down to the low-water mark, as ``fit`` does."""
        used, budget, dropped = self.used(), self.max_seq_len - reserve, 0
        if used <= budget:
            return 0
        target = self.low_water(budget)
        for turn in self.turns:
            if used <= target:
                break
            used -= turn.positions
            dropped += 1
        return dropped

    def in_memory(self, reserve: int) -> int:
        """Positions of the references and the turns the next prompt can still hold (never over the budget
        unless the references alone are)."""
        return self.used() - sum(t.positions for t in list(self.turns)[: self.overflow(reserve)])

    def budget(self, reserve: int, text_positions: int) -> int:
        return self.max_seq_len - reserve - text_positions

    def low_water(self, budget: int) -> int:
        """What references + turns may hold right after a prune: the references and ``prune_to`` of
        the positions left to turns."""
        refs = self.reference_positions()
        return refs + int(self.prune_to * max(0, budget - refs))

    def fit(self, reserve: int, text_positions: int) -> list[Turn]:
        """``plan_fit``, applied: the oldest turns dropped down to the low-water mark; returns them."""
        dropped = self.plan_fit(reserve, text_positions)
        self.drop(dropped)
        return dropped

    def plan_fit(self, reserve: int, text_positions: int) -> list[Turn]:
        """The oldest turns to drop, down to the low-water mark, when the prompt does not fit (none when
        it fits). Changes nothing: ``drop`` applies it once the segment is kept.

        Raises CompanionError when the references and the text alone do not fit (the caller splits the text).
        """
        budget = self.budget(reserve, text_positions)
        if self.reference_positions() > budget:
            raise TextTooLong(self.reference_positions() + text_positions + reserve, self.max_seq_len)
        dropped: list[Turn] = []
        used = self.used()
        if used <= budget:
            return dropped
        target = self.low_water(budget)
        for turn in self.turns:
            if used <= target:
                break
            used -= turn.positions
            dropped.append(turn)
        return dropped

    def segments(self, skip: int = 0) -> list[Segment]:
        """The prompt's context: references, then the turns (without the ``skip`` oldest)."""
        return self.references() + [t.segment() for t in list(self.turns)[skip:]]

    def first_seq(self, skip: int = 0) -> int | None:
        """The seq of the oldest turn (after the ``skip`` oldest), None without one."""
        return self.turns[skip].seq if len(self.turns) > skip else None

    def report(self, reserve: int) -> list[ContextRow]:
        """What is in memory and its cost, in prompt order, then the frames reserved for the reply."""
        rows = [
            ContextRow(f"reference {v.name} ({_seconds(v.codes, self.frame_rate)})", v.positions, True)
            for v in self.voices.values() if v.positions
        ]
        gone = self.overflow(reserve)
        rows += [
            ContextRow(f"turn {t.seq} {t.voice}: {_short(t.text)} ({_seconds(t.codes, self.frame_rate)})", t.positions, False)
            for t in list(self.turns)[gone:]
        ]
        if gone:
            rows.append(ContextRow(f"{gone} older turn(s): no longer fit, dropped at the next reply", 0, False))
        rows.append(ContextRow("reserved for the next reply", reserve, False))
        return rows


class TextTooLong(CompanionError):
    """The references plus this text leave no room: the caller splits the text and tries again."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"the text does not fit the context even with the conversation dropped ({needed} positions needed, "
            f"{available} available): say it in shorter pieces or raise context.max_seq_len in config.yaml"
        )
        self.needed = needed
        self.available = available


def _seconds(codes: torch.Tensor | None, frame_rate: float) -> str:
    return f"{(0 if codes is None else codes.shape[-1]) / frame_rate:.1f} s"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"
