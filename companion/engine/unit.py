"""One generated frame as a unit with static buffers (``GraphedFrame``), which ``cuda_graphs.py`` records
and replays: sampling with the unit's own sampler, the depth decoder at fixed positions, and the backbone
feed at a position the step itself advances, all on tensors that stay where they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from companion.engine.frames import FrameLoop
from companion.engine.fused import Compiler, FusedStep
from companion.engine.sampling import BatchSampler, Sampler


class GraphedFrame:
    """The per-frame work of ``loop`` for ``rows`` streams (rows 0..B-1 of the caches) with static
    buffers, sampling with its own ``sampler`` (a Sampler for one stream, a BatchSampler for several)."""

    def __init__(self, loop: FrameLoop, sampler: Sampler | BatchSampler, rows: int = 1) -> None:
        self.loop, self.sampler, self.batch = loop, sampler, rows
        width = loop.lm_head.shape[1]
        # Static buffers: the step reads hidden/pos and writes codes/hidden/pos.
        self.hidden = torch.zeros(rows, 1, width, dtype=loop.lm_head.dtype, device=loop.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=loop.device)
        self.codes = torch.zeros(rows, loop.num_codebooks, dtype=torch.long, device=loop.device)
        self.replay: Callable[[], None] | None = None
        # What a capture records: the step itself, or its compiled pieces (``fused.py``), which do the
        # same work in fewer kernels; ``step`` stays the reference the self-check compares with.
        self.fast: Callable[[], None] = self.step
        self.fused = False

    def fuse(self, compiler: Compiler | None = None) -> None:
        """Record the compiled pieces of the step instead of the step (compiled at the warm-up)."""
        self.fast, self.fused = FusedStep(self, compiler), True

    def step(self) -> None:
        """One frame from ``hidden`` at ``pos``: codes, then feed them, advance ``pos``."""
        self.sampler.row = 0
        codes = self.loop.depth_frame(self.hidden, self.sampler)
        self.codes.copy_(codes)
        fed = self.loop.backbone.forward_at(self.loop.embed_frame_rows(codes), self.pos)
        self.hidden.copy_(fed)
        self.pos.add_(1).clamp_(max=self.loop.scratch)  # padding rows stay at the scratch position

    def warm_up(self) -> None:
        """Run one step at the scratch position (allocations, kernel choice) without touching the context."""
        self.load(torch.zeros_like(self.hidden), [self.loop.scratch] * self.batch)
        with torch.no_grad():
            self.fast()

    def load(self, hidden: torch.Tensor, positions: int | list[int]) -> None:
        """Point the step at `(B, 1, H)` ``hidden`` for the frame at backbone ``positions`` (one per row)."""
        self.hidden.copy_(hidden)
        at = [positions] if isinstance(positions, int) else positions
        self.pos.copy_(torch.tensor(at, dtype=torch.long))

    def run(self) -> None:
        """One frame through the recorded replay."""
        assert self.replay is not None
        with torch.no_grad():
            self.replay()

    def frames(
        self, hidden: torch.Tensor, max_frames: int, cancel: threading.Event | None = None
    ) -> Iterator[torch.Tensor]:
        """Like ``FrameLoop.frames``: frames `(K,)` until the end frame, the cap or ``cancel``."""
        loop = self.loop
        self.load(hidden, loop.length)
        for _ in range(max_frames):
            if cancel is not None and cancel.is_set():
                return
            self.sampler.begin_frame()  # fresh noise for this frame (outside the graph)
            try:
                self.run()
            except Exception as err:
                raise ReplayFailed(f"{type(err).__name__}: {first_line(err)}") from err
            frame = self.codes[0].clone()
            if not bool(frame.any()):  # the one host sync per frame
                return
            # The step always feeds the frame back: its keys/values are written, so record it.
            loop.record_frame(frame)
            yield frame


class ReplayFailed(Exception):
    """A replay raised during a turn (after its self-check passed)."""


def new_unit(loop: FrameLoop, greedy: bool, rows: int = 1, batched: bool = False,
             width: int | None = None) -> GraphedFrame:  # fmt: skip
    """A unit for one kind of sampling: greedy, or top-k over every decodable code (ranks past the
    configured top-k masked at run time, so one unit serves every temperature and top-k; ``width``: over
    that many best codes only, for top-k up to it); for one stream, or ``rows`` streams at once
    (``batched``: for the loop of several streams, even at one row). ``unit.fuse()`` compiles its step
    (``fused.py``)."""
    if rows > 1 or batched:
        batch = BatchSampler(rows, greedy, loop.device, loop.num_codebooks, loop.decodable_codes, loop.vocab)
        return GraphedFrame(loop, batch, rows)
    sampler = Sampler(
        0.0 if greedy else 1.0, 1 if greedy else 2, 0, loop.device, loop.num_codebooks,
        loop.decodable_codes, width=width or loop.decodable_codes or loop.vocab, vocab=loop.vocab,
    )  # fmt: skip
    return GraphedFrame(loop, sampler)


def first_line(err: BaseException) -> str:
    """An exception's first line (torch.compile's errors run to pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
