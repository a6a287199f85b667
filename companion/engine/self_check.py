"""The self-check a replayable unit passes at its first use: frames replayed against the same frames
run step by step (see cuda_graphs.py), and how close is close enough.

A replay of the step itself (a CUDA graph) must be the step bit for bit. A compiled replay (fused.py)
rounds otherwise, so it must be within a tolerance per dtype: the step-by-step frame is made to pick
the replayed codes (``ForcedPicks``), so one code that a near tie sent the other way does not make every
later number differ, and each pick and each hidden state is held to the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from companion.engine.sampling import BatchSampler, Sampler

if TYPE_CHECKING:
    from companion.engine.frames import FrameLoop
    from companion.engine.unit import GraphedFrame


@dataclass(frozen=True)
class Tolerance:
    """How far a replayed frame may be from the step-by-step frame, from the same state and noise and
    given the same codes (the step-by-step path is made to pick the replayed frame's codes).

    ``relative``: the largest difference allowed, relative, for both what the frame computes (the
    hidden state after the frame, an L2 norm over the frame's rows) and what it picks (how far below the
    step-by-step path's best score each replayed code is, relative to the largest score: a near tie that
    rounding decided the other way is a small gap; a wrong code is a large one)."""

    relative: float


# float32 fuses at ~1e-6; bf16 and fp16 round the fused and unfused arithmetic at different points,
# a few units in the last place per operation, compounded through the layers.
TOLERANCE = {
    torch.float32: Tolerance(relative=1e-4),
    torch.bfloat16: Tolerance(relative=5e-2),
    torch.float16: Tolerance(relative=1e-2),
}
FUSED_CHECK_FRAMES = 8
SELF_CHECK_FRAMES = 3  # frames of a unit's self-check (a fused unit's: FUSED_CHECK_FRAMES)
SELF_CHECK_SEED = 1234  # the sampled unit's self-check draws its noise from this seed, in both runs
EXACT = Tolerance(relative=0.0)  # a replay of the step itself: the same codes, the same bits


def self_check(loop: FrameLoop, unit: GraphedFrame, state: Callable[[GraphedFrame, int], None]) -> str | None:
    """None when frames replayed agree with the same frames run eagerly (``unit.step``), each from the
    same state and noise; else what differed. ``state(unit, seed)`` loads the first frame's state and
    noise; each frame is replayed, then run eagerly from the state the replay started from, picking
    the replayed codes (``ForcedPicks`` measures how far each was from the eager pick), and the next
    frame goes on from there. Only rows of streams are compared (padding rows stay at the scratch
    position). Both write keys/values only after the cached prefix.

    A replay of the step itself must be the eager step bit for bit (its own picks, the same hidden
    states and positions); a fused replay must be within ``TOLERANCE`` of its dtype, over more
    frames."""
    frames = FUSED_CHECK_FRAMES if unit.fused else SELF_CHECK_FRAMES
    tolerance = TOLERANCE.get(unit.hidden.dtype, TOLERANCE[torch.float16]) if unit.fused else EXACT
    state(unit, SELF_CHECK_SEED)
    live = unit.pos != loop.scratch
    replayed: list[tuple[torch.Tensor, torch.Tensor]] = []
    eager: list[tuple[torch.Tensor, torch.Tensor]] = []
    gaps: list[torch.Tensor] = []
    sampler = unit.sampler
    for frame in range(frames):
        if frame:
            state_noise(unit, SELF_CHECK_SEED + frame)
        sampler.begin_frame()  # a one-stream unit's noise for this frame (from the seed)
        hidden, pos = unit.hidden.clone(), unit.pos.clone()
        with torch.no_grad():
            unit.run()
        replayed.append((torch.cat([unit.codes[live], unit.pos[live, None]], dim=1), unit.hidden[live].clone()))
        forced = ForcedPicks(sampler, unit.codes.clone(), live, tolerance.relative)
        unit.hidden.copy_(hidden)
        unit.pos.copy_(pos)
        unit.sampler = forced  # type: ignore[assignment]  # the eager step picks the replayed codes
        try:
            with torch.no_grad():
                unit.step()
        finally:
            unit.sampler = sampler
        eager.append((torch.cat([unit.codes[live], unit.pos[live, None]], dim=1), unit.hidden[live].clone()))
        gaps += forced.gaps
    return agreement(replayed, eager, gaps, tolerance)



def agreement(replayed: list[tuple[torch.Tensor, torch.Tensor]], eager: list[tuple[torch.Tensor, torch.Tensor]],
              gaps: list[torch.Tensor], tolerance: Tolerance) -> str | None:  # fmt: skip
    """None when replayed frames are close enough to the step-by-step ones; else what was too far.

    ``replayed`` and ``eager``: per frame, `(codes and positions, hidden state)`, the step-by-step frame
    made to pick the replayed codes; ``gaps``: how far below its best score each of those codes was
    (``sampling.ForcedPicks``)."""
    for (codes_r, _), (codes_e, _) in zip(replayed, eager, strict=True):
        if not torch.equal(codes_r, codes_e):
            return "the frames went to other positions"
    every = torch.cat([g.flatten().float().cpu() for g in gaps]) if gaps else torch.zeros(0)
    too_far = every[~(every <= tolerance.relative)]  # a NaN is too far
    if too_far.numel():
        return f"a code {float(too_far.max()):.2g} below the best choice (at most {tolerance.relative:g})"
    for (_, hidden_r), (_, hidden_e) in zip(replayed, eager, strict=True):
        scale = float(hidden_e.float().norm())
        error = float((hidden_r.float() - hidden_e.float()).norm()) / max(scale, 1e-30)
        if not error <= tolerance.relative:
            return f"a relative difference of {error:.2g} (at most {tolerance.relative:g})"
    return None


def state_noise(unit: GraphedFrame, seed: int) -> None:
    """Fill a several-stream unit's noise from ``seed`` (the self-check's frames after the first)."""
    sampler = unit.sampler
    if isinstance(sampler, BatchSampler) and not sampler.greedy:
        generator = torch.Generator(device=sampler.noise.device)
        generator.manual_seed(seed)
        sampler.noise.uniform_(generator=generator)


class ForcedPicks:
    """A sampler for checking another path's codes: it scores each codebook as ``sampler`` does, but
    picks the `(B, K)` ``codes`` given, and records per row how far each pick was from a choice this
    sampler could make, relative to the row's largest score (or logit): 0 for its own pick.

    ``tolerance`` (relative) is what rounding may move a logit by. A sampled pick is compared with the
    best score among the codes surely in the top-k (logits above the k-th best by more than the
    tolerance): a code at the edge of the top-k may be in or out for the other path, and with its
    noise it may be the best. A pick outside this sampler's top-k is measured by how far its logit is
    below the k-th best (a near tie at the edge is close; any other code is far); a code no logit row
    has is infinitely far. ``rows`` selects the rows recorded (padding rows of a several-stream unit
    are left out)."""

    def __init__(self, sampler: Sampler | BatchSampler, codes: torch.Tensor, rows: torch.Tensor,
                 tolerance: float = 0.0) -> None:  # fmt: skip
        self.sampler, self.codes, self.rows, self.tolerance = sampler, codes, rows, tolerance
        self.row = 0
        self.gaps: list[torch.Tensor] = []

    def begin_frame(self) -> None:
        self.row = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        row, self.row = self.row, self.row + 1
        scores, indices = self.sampler.scores(logits, row)
        self.gaps.append(self._gap(logits, scores.float(), indices, self.codes[:, row])[self.rows])
        return self.codes[:, row]

    def _gap(self, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor | None,
             forced: torch.Tensor) -> torch.Tensor:  # fmt: skip
        codes = logits[..., : self.sampler.codes or None].shape[-1]
        inside = forced < codes
        safe = forced.clamp(max=codes - 1)[:, None]
        if indices is None:  # greedy: the scores are the logits
            gap = (scores.amax(-1) - scores.gather(-1, safe)[:, 0]) / _largest(scores)
            return gap.masked_fill(~inside, float("inf"))
        candidate = torch.isfinite(scores)  # (B, width): the top-k (ranks past it are masked)
        values = logits.float().gather(-1, indices)  # their logits
        scale = _largest(values.masked_fill(~candidate, 0.0))
        kth = values.masked_fill(~candidate, float("inf")).amin(-1)
        sure = candidate & (values - kth[:, None] >= self.tolerance * scale[:, None])
        best = scores.masked_fill(~sure, float("-inf")).amax(-1)
        match = (indices == safe) & candidate
        picked = scores.gather(-1, match.float().argmax(-1, keepdim=True))[:, 0]
        among = ((best - picked).clamp_min(0) / _largest(scores)).nan_to_num(0.0)  # no sure code: nothing better
        edge = (kth - logits.float().gather(-1, safe)[:, 0]).clamp_min(0) / scale
        gap = torch.where(match.any(-1), among, edge)
        return gap.masked_fill(~inside, float("inf"))


def _largest(values: torch.Tensor) -> torch.Tensor:
    """`(B,)` each row's largest finite magnitude (the scale gaps are relative to)."""
    return values.nan_to_num(0.0, 0.0, 0.0).abs().amax(-1).clamp_min(1e-30)
