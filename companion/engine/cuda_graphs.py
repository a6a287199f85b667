"""One generated frame captured as a CUDA graph (CUDA only; eager everywhere else).

A frame is ~300 small kernels (31 depth-decoder steps + one backbone step); at batch 1 on a GPU their
launch overhead, not the arithmetic, sets the speed. ``GraphedFrame`` records the whole frame once:
sampling (the Sampler's static noise buffer), the depth decoder at fixed positions 0..K, and the
backbone feed through ``DecoderStack.forward_at`` (static shapes: the full cache with a position mask,
the position in a device tensor that the graph itself advances). Each frame then costs one replay and
one host sync for the end-of-speech check.

The same ``step()`` runs eagerly with ``capture=False``, which is how the CPU tests check its logic.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from companion.engine.sampling import Sampler

if TYPE_CHECKING:
    from companion.engine.frames import FrameLoop

log = logging.getLogger(__name__)


def graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs on CUDA devices unless ``COMPANION_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("COMPANION_CUDA_GRAPHS", "1") != "0"


class GraphedFrame:
    """The per-frame work of ``loop`` with ``sampler``'s settings, as one replayable unit."""

    def __init__(self, loop: FrameLoop, sampler: Sampler, capture: bool = True) -> None:
        self.loop, self.sampler = loop, sampler
        width = loop.lm_head.shape[1]
        # Static buffers: the graph reads hidden/pos and writes codes/hidden/pos.
        self.hidden = torch.zeros(1, 1, width, dtype=loop.lm_head.dtype, device=loop.device)
        self.pos = torch.zeros((), dtype=torch.long, device=loop.device)
        self.codes = torch.zeros(loop.num_codebooks, dtype=torch.long, device=loop.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def step(self) -> None:
        """One frame from ``hidden`` at ``pos``: codes, then feed them, advance ``pos``."""
        self.sampler.row = 0
        codes = self.loop.depth_frame(self.hidden, self.sampler)
        self.codes.copy_(codes)
        fed = self.loop.backbone.forward_at(self.loop.embed_frames(codes[None]), self.pos)
        self.hidden.copy_(fed)
        self.pos.add_(1)

    def _capture(self) -> None:
        # Warm up on a side stream (allocations, kernel selection), then record one step. Both write
        # keys/values at position 0, so the caller resets the prefix cache afterwards.
        stream = torch.cuda.Stream(self.loop.device)
        stream.wait_stream(torch.cuda.current_stream(self.loop.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.pos.zero_()
                self.step()
        torch.cuda.current_stream(self.loop.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.step()
        self.graph = graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.step()

    def frames(
        self, hidden: torch.Tensor, max_frames: int, cancel: threading.Event | None = None
    ) -> Iterator[torch.Tensor]:
        """Like ``FrameLoop.frames``: frames `(K,)` until the end frame, the cap or ``cancel``."""
        loop = self.loop
        self.hidden.copy_(hidden)
        self.pos.fill_(loop.length)
        for _ in range(max_frames):
            if cancel is not None and cancel.is_set():
                return
            self.sampler.begin_frame()  # fresh noise for this frame (outside the graph)
            self.run()
            frame = self.codes.clone()
            if not bool(frame.any()):  # the one host sync per frame
                return
            # The graph always feeds the frame back: record it as cached.
            loop.record_frame(frame)
            yield frame


def graphed(loop: FrameLoop, sampler: Sampler, cache: dict[tuple, GraphedFrame]) -> GraphedFrame | None:
    """The captured frame for ``sampler``'s settings (captured on first use), or None to stay eager."""
    key = (sampler.greedy, sampler.temperature, sampler.noise.shape[1], sampler.codes)
    if key in cache:
        unit = cache[key]
        sampler.noise = unit.sampler.noise  # the graph reads this buffer; this call's generator fills it
        unit.sampler = sampler
        return unit
    try:
        unit = GraphedFrame(loop, sampler)
    except Exception as err:  # capture is an optimisation: fall back to eager, once, with the reason
        log.warning("CUDA graph capture failed (%s: %s); generating eagerly", type(err).__name__, err)
        return None
    finally:
        loop.reset()  # warm-up and capture wrote position 0
    cache[key] = unit
    return unit
