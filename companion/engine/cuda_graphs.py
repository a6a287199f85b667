"""One generated frame as a replayable unit: a CUDA graph on CUDA, and the same logic eagerly in tests.

A frame is ~300 small kernels (31 depth-decoder steps + one backbone step); at batch 1 on a GPU their
launch overhead, not the arithmetic, sets the speed. ``GraphedFrame.step`` is the whole frame with
static shapes: sampling (the Sampler's static noise, temperature and top-k tensors), the depth decoder
at fixed positions 0..K, and the backbone feed through ``DecoderStack.forward_at`` (the full cache with
a position mask, the position in a device tensor that the step itself advances). Recorded once, each
frame then costs one replay and one host sync for the end-of-speech check.

How a step becomes a replay is a strategy, ``Capture``: the base class replays the step eagerly (what
the CPU tests drive, optionally recording, failing or corrupting), ``CudaGraphCapture`` records a CUDA
graph. ``FrameGraphs`` holds the logic around it, the same on every device:

- one unit per kind of sampling (greedy, or temperature + top-k: both values live in device tensors,
  so changing them re-captures nothing), all captured into one memory pool;
- warm-up and capture run at the backbone's scratch position, after the context: the cached prefix is
  never touched;
- a self-check at each unit's first use: a few frames replayed and run eagerly from the same state
  with the same noise (greedy for the greedy unit; sampled, with the turn's temperature and top-k and a
  fixed seed, for the sampled one); both write only past the cached prefix; any difference turns graphs
  off;
- a failed capture, a failed self-check, or a replay that fails later turns graphs off for as long as
  the ``Capture`` lives (the CUDA one lives as long as the process), with one line saying so;
  generation goes on eagerly, exactly (a turn whose replay failed goes on from the frames it has).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from companion.engine.frames import FrameLoop
from companion.engine.fused import Compiling, Fusion, first_compile_notice
from companion.engine.sampling import Sampler
from companion.engine.self_check import self_check
from companion.engine.unit import GraphedFrame, ReplayFailed, first_line, new_unit

log = logging.getLogger(__name__)


def graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs on CUDA devices unless ``COMPANION_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("COMPANION_CUDA_GRAPHS", "1") != "0"


class Capture:
    """How a ``GraphedFrame``'s step becomes a replay. This base replays the step eagerly (after the
    warm-up a real capture does); subclasses record it. ``off`` says why units are no longer made (None
    while they are): it is remembered for as long as this object lives."""

    def __init__(self) -> None:
        self.off: str | None = None

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        unit.warm_up()
        return unit.fast


class CudaGraphCapture(Capture):
    """Records the step as a CUDA graph; every graph of the process shares one memory pool. (Each
    graph's inputs and outputs live in buffers allocated before capture, so graphs sharing the pool may
    replay in any order.)"""

    def __init__(self) -> None:
        super().__init__()
        self.pool: Any = None  # the pool handle of the first graph

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        device = unit.loop.device
        # Warm up on a side stream (allocations, kernel selection), then record one step.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                unit.warm_up()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            unit.fast()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay


CUDA_GRAPHS = CudaGraphCapture()  # the process's: a failure or a failed self-check is remembered here


def default_capture(device: torch.device) -> Capture | None:
    """The process's CUDA graph capture on CUDA (unless ``COMPANION_CUDA_GRAPHS=0``); None elsewhere."""
    return CUDA_GRAPHS if graphs_wanted(device) else None


Key = tuple[int, bool, "int | None"]  # a unit's streams, greedy, and how many codes it ranks (None: all)


class FrameGraphs:
    """The captured frames of one ``FrameLoop``: at most one unit per kind of sampling (greedy or not).

    With ``fusion`` (not None), units are compiled (``fused.py``) while ``fusion.off`` is None; a unit
    that fails to compile or whose self-check fails turns fusion off, and the unit is made again
    without it. ``fused_only``: units serve only when fused (the eager ``Capture`` on a CPU, where a
    replayed step without fusion is no faster than the step-by-step loop); there a sampled unit ranks
    exactly the top-k best codes, one unit per top-k (ranking every code costs a CPU more than the rest
    of a codebook's work), where a recorded unit ranks every code for every top-k."""

    def __init__(self, loop: FrameLoop, capture: Capture, fusion: Fusion | None = None,
                 fused_only: bool = False) -> None:  # fmt: skip
        self.loop, self.capture, self.fusion, self.fused_only = loop, capture, fusion, fused_only
        self.units: dict[Key, GraphedFrame] = {}  # (streams, greedy, width) -> unit
        self.checked: set[Key] = set()
        self.jobs: dict[Key, Compiling] = {}  # units compiling (or compiled) beside generation
        self.wanted: dict[Key, Callable[[], None]] = {}  # units to compile once the turn's first audio is out

    @property
    def fusing(self) -> bool:
        """Whether new units are compiled."""
        return self.fusion is not None and self.fusion.off is None

    def frames(
        self,
        hidden: torch.Tensor,
        temperature: float,
        topk: int,
        seed: int | None,
        max_frames: int,
        cancel: threading.Event | None = None,
    ) -> Iterator[torch.Tensor] | None:
        """Frames through a replayed unit, or None when graphs are off (the caller generates eagerly).
        ``hidden`` `(1, 1, H)` is the state after the prompt, at position ``loop.length``."""
        greedy = temperature <= 0.0 or topk <= 1

        def state(unit: GraphedFrame, seed: int) -> None:
            unit.load(hidden, self.loop.length)
            assert isinstance(unit.sampler, Sampler)
            unit.sampler.configure(temperature, topk, seed)  # the greedy unit ignores them

        width = min(topk, self.loop.decodable_codes or self.loop.vocab) if self.fused_only and not greedy else None
        unit = self._checked(1, greedy, False, state, width) if max_frames > 0 else self._unit(1, greedy, False, width)
        if unit is None:
            return None
        assert isinstance(unit.sampler, Sampler)
        unit.sampler.configure(temperature, topk, seed)
        return self._replayed(unit, hidden, temperature, topk, seed, max_frames, cancel)

    def _replayed(
        self,
        unit: GraphedFrame,
        hidden: torch.Tensor,
        temperature: float,
        topk: int,
        seed: int | None,
        max_frames: int,
        cancel: threading.Event | None,
    ) -> Iterator[torch.Tensor]:
        """``unit.frames``; when a replay fails, graphs go off and the turn goes on eagerly from the frames
        already made: the hidden state after the last recorded frame, and the noise a fresh sampler with
        the same seed draws after skipping the frames done (so a seeded turn is the same either way)."""
        made: list[torch.Tensor] = []
        try:
            for frame in unit.frames(hidden, max_frames, cancel):
                made.append(frame)
                yield frame
            return
        except ReplayFailed as failed:
            self._failed(f"replaying a frame failed ({failed})", unit)
        loop = self.loop
        sampler = Sampler(temperature, topk, seed, loop.device, loop.num_codebooks, loop.decodable_codes,
                          vocab=loop.vocab)
        for _ in made:
            sampler.begin_frame()
        if made:  # the state after the last frame (its keys/values are rewritten with the same values)
            with torch.no_grad():
                hidden = loop.backbone.forward(loop.embed_frames(made[-1][None]), loop.length - 1)
        yield from loop.frames(hidden, sampler, max_frames - len(made), cancel)

    def _unit(self, rows: int, greedy: bool, batched: bool, width: int | None = None) -> GraphedFrame | None:
        """The unit for ``rows`` streams and this kind of sampling (``width``: ranking that many codes, None:
        every code), recorded on first use; None when graphs are off (or recording fails). While fusing,
        the unit is compiled: at once, or, when the fusion compiles in the background, once its compile
        beside generation is done (until then the step's own recorded unit serves, or nothing on a CPU).
        A unit that fails to compile turns fusion off and is made without it."""
        if self.capture.off is not None:
            return None
        key = (rows, greedy, width)
        unit = self.units.get(key)
        if unit is not None and unit.fused and not self.fusing:  # compiling went off meanwhile
            del self.units[key]
            unit = None
        if self.fusing and (unit is None or not unit.fused) and self._compiled(key, rows, greedy, batched, width):
            unit = self._record(key, rows, greedy, batched, width, fused=True) or self.units.get(key)
        if unit is not None or self.capture.off is not None:
            return unit
        if self.fused_only or (self.fusion is not None and self.fusion.busy):
            return None  # on CUDA nothing is recorded while a frame compiles beside generation
        # The step's own unit: it serves until a frame compiled beside generation replaces it.
        return self._record(key, rows, greedy, batched, width, fused=False)

    def _record(self, key: Key, rows: int, greedy: bool, batched: bool, width: int | None,
                fused: bool) -> GraphedFrame | None:  # fmt: skip
        """A new unit for ``key`` (compiled when ``fused``), recorded; it replaces the key's unit and is
        self-checked at its first use. A failure turns compiling off (``fused``) or graphs off: None."""
        unit = new_unit(self.loop, greedy, rows, batched, width)
        try:
            if fused:
                assert self.fusion is not None
                unit.fuse(self.fusion.compiler)
            unit.replay = self.capture.record(unit)  # a fused unit compiles in its warm-up (or finds it compiled)
        except Exception as err:  # capture is an optimisation: generate eagerly from now on
            if fused:
                self._fusion_off(f"compiling a frame failed ({type(err).__name__}: {first_line(err)})")
            else:
                self._turn_off(f"capturing a frame failed ({type(err).__name__}: {err})")
            return None
        self.units[key] = unit
        self.checked.discard(key)
        return unit

    def _compiled(self, key: Key, rows: int, greedy: bool, batched: bool, width: int | None) -> bool:
        """Whether ``key``'s unit may be compiled and recorded now. Without a background fusion: yes (it
        compiles at its warm-up). With one, the first ask wants it compiled beside generation, on a twin
        of the loop (started by ``start_wanted``, or by the next ask); no until that is done and nothing
        else compiles; a compile that failed turns fusion off (with its one line)."""
        assert self.fusion is not None
        if not self.fusion.background:
            first_compile_notice()
            return True
        job = self.jobs.get(key)
        if job is None:
            if key not in self.wanted:  # started once this turn's first audio is out (``start_wanted``)
                self.wanted[key] = lambda: self._compile_twin(rows, greedy, batched, width)
                return False
            job = self._start(key)  # asked again before that: now
        if self.fusion.busy:
            return False
        if job.error is not None:
            del self.jobs[key]
            self._fusion_off(f"compiling a frame failed ({type(job.error).__name__}: {first_line(job.error)})")
            return False
        return True

    def start_wanted(self) -> None:
        """Start compiling the frames turns have asked for. The engine calls it once a turn's first audio
        is out: compiling holds Python's lock much of the time, and would delay that audio."""
        for key in list(self.wanted):
            if self.fusing:
                self._start(key)

    def _start(self, key: Key) -> Compiling:
        assert self.fusion is not None
        first_compile_notice(background=True)
        job = self.jobs[key] = self.fusion.start(self.wanted.pop(key))
        return job

    def _compile_twin(self, rows: int, greedy: bool, batched: bool, width: int | None) -> None:
        """Compile ``key``'s frame on a twin of the loop (in the compile's thread): its trial frame writes
        the twin's caches and buffers only. The unit made later from the same code finds it compiled."""
        assert self.fusion is not None
        unit = new_unit(self.loop.twin(), greedy, rows, batched, width)
        unit.fuse(self.fusion.compiler)
        unit.warm_up()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until every frame compiling beside generation is done (a benchmark's warm-up); whether
        all were done within ``timeout`` seconds (None: no limit)."""
        return all(job.done.wait(timeout) for job in list(self.jobs.values()))

    def batch_unit(self, rows: int, greedy: bool, state: Callable[[GraphedFrame, int], None]) -> GraphedFrame | None:
        """The checked unit for ``rows`` streams (several streams generated together), or None when graphs
        are off. At its first use it is self-checked: ``state(unit, seed)`` loads the streams' hidden
        states, positions and sampling into it (noise drawn from ``seed``), and a few frames replayed must
        equal the same frames run eagerly on every stream's row."""
        return self._checked(rows, greedy, True, state)

    def _checked(self, rows: int, greedy: bool, batched: bool, state: Callable[[GraphedFrame, int], None],
                 width: int | None = None) -> GraphedFrame | None:  # fmt: skip
        """The unit, self-checked at its first use (``state`` loads the state the check starts from): a
        unit that fails its check turns fusion off (a fused one, made again without it) or graphs off."""
        unit = self._unit(rows, greedy, batched, width)
        key = (rows, greedy, width)
        if unit is None or key in self.checked:
            return unit
        streams = f" of {rows} streams" if batched else ""
        try:
            why = self_check(self.loop, unit, state)
        except Exception as err:  # a replay that fails is as bad as one that differs
            why = f"replaying a frame{streams} failed in a self-check ({type(err).__name__}: {err})"
        else:
            if why is not None:
                why = f"the replay of a frame{streams} differed from the step-by-step path in a self-check: {why}"
        if why is None:
            self.checked.add(key)
            return unit
        if unit.fused:
            del self.units[key]
            self._fusion_off(why)
            return self._checked(rows, greedy, batched, state, width)
        self._turn_off(why)
        return None

    def replay_failed(self, err: Exception, unit: GraphedFrame) -> None:
        """A replay of several streams raised during a turn: graphs (or, for a compiled unit, compiling)
        go off; the caller goes on eagerly."""
        self._failed(f"replaying a frame failed ({type(err).__name__}: {first_line(err)})", unit)

    def _failed(self, why: str, unit: GraphedFrame) -> None:
        """``unit`` failed in a turn: a compiled one turns compiling off (the next turn makes the unit again
        without it), any other turns graphs off."""
        if unit.fused:
            self._fusion_off(why)
        else:
            self._turn_off(why)

    def _turn_off(self, why: str) -> None:
        self.capture.off = why
        log.warning("CUDA graphs turned off for this run: %s; generating without them (slower)", why)

    def _fusion_off(self, why: str) -> None:
        assert self.fusion is not None
        self.fusion.off = why
        log.warning("compiled frames turned off for this run: %s; generating without them (slower)", why)
