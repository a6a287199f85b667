"""Several streams through one frame loop: slots, joining, leaving and padding (see docs/engine.md).

An engine with ``max_batch`` > 1 runs its frames in one thread, the frame thread, started when a
stream opens and ended when none is left. Each stream (one ``Engine.stream`` call, consumed by its own
thread) has a slot: a row of the backbone cache with its own prefix record, its own sampler and seed,
and its own Mimi decoder. Per iteration the frame thread:

1. lets go of the streams that left (closed, cancelled, failed): their slots are free at once;
2. prefills one chunk of the first joining stream (the whole prompt when no stream is generating);
   a stream whose prompt is in joins the generating ones at this frame boundary;
3. generates one frame for every generating stream at once: rows 0..``max_batch``-1 of the caches,
   always all of them; slots that generate nothing are padding (their rows are computed and thrown
   away, nothing of them is written or recorded). The weights are read once for all rows.

Frames go to each stream's queue; its consumer decodes them into audio chunks. A stream's own end
frame, its ``max_frames``, its cancel, or its consumer leaving ends only that stream.

Why every frame has the same number of rows: a device picks its matrix-product kernel by the number
of rows (a matrix-vector kernel for one row and blocked ones for more in CPU BLAS; AMX tiles for bf16
on some CPUs; whatever cuBLAS chooses on a GPU), and two kernels may round the same row differently.
At one fixed shape every row is computed by the same kernels from its own inputs only (every other
operation is row by row, attention over each slot's own prefix), so another stream joining, leaving,
failing or being cancelled never changes a stream's codes, on any device and in any dtype. Padding
costs little where a frame is bound by reading the weights or by launches (GPUs, CPUs with bf16
matrix units); docs/engine.md has the figures.

A new stream takes the free slot where it loses the fewest positions: those of its prompt the slot does
not hold, plus those of the slot's record it would overwrite. A conversation that comes back so finds
its own slot, and a new one takes an empty slot (or the shortest record) rather than another
conversation's; of equal slots, the one unused longest. Prefix records change only
after the forward that wrote what they claim, as in the one-stream loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from companion.engine.errors import EngineBusy
from companion.engine.sampling import RowSamplers, Sampler
from companion.engine.stack import Stopped
from companion.engine.types import GenerationOptions
from companion.engine.unit import GraphedFrame

if TYPE_CHECKING:
    from companion.engine.engine import Engine


@dataclass(eq=False)
class Stream:
    """One stream of a batching engine, from ``open`` until its consumer leaves."""

    rows: torch.Tensor  # (P, K + 1) prompt rows on the model's device
    options: GenerationOptions
    cancel: threading.Event | None
    name: str
    sampler: Sampler
    slot: int = -1
    state: str = "joining"  # joining -> generating -> done
    hidden: torch.Tensor | None = None  # (1, 1, H) the state the next frame starts from
    made: int = 0  # frames generated
    prefill_start: int = -1
    left: bool = False  # its consumer let go
    events: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)

    def stopped(self) -> bool:
        return self.left or (self.cancel is not None and self.cancel.is_set())


class Batcher:
    """The frame thread and the slots of an engine with ``max_batch`` > 1."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = engine.loop
        self.max_batch = engine.max_batch
        self._cond = threading.Condition()
        self._streams: list[Stream] = []  # joining or generating, in the order they opened
        self._thread: threading.Thread | None = None
        self._used = [0] * self.max_batch  # when each slot last had a stream (a counter)
        self._clock = 0
        self.make_sampler: Callable[[GenerationOptions], Sampler] = self._sampler  # a stream's sampler

    def _sampler(self, o: GenerationOptions) -> Sampler:
        loop = self.loop
        return Sampler(o.temperature, o.topk, o.seed, loop.device, loop.num_codebooks, loop.decodable_codes,
                       vocab=loop.vocab)

    @property
    def active(self) -> int:
        """Streams open now (joining or generating)."""
        with self._cond:
            return len(self._streams)

    # ---- the consumers' side ----------------------------------------------------------------------

    def open(self, rows: torch.Tensor, options: GenerationOptions, cancel: threading.Event | None,
             name: str) -> Stream:  # fmt: skip
        """A new stream in a free slot; raises EngineBusy when all ``max_batch`` slots are taken."""
        stream = Stream(rows.to(self.loop.device), options, cancel, name, self.make_sampler(options))
        with self._cond:
            taken = {s.slot for s in self._streams}
            free = [slot for slot in range(self.max_batch) if slot not in taken]
            if not free:
                raise EngineBusy(self._streams[0].name, self.max_batch)
            stream.slot = min(free, key=lambda slot: (self._cost(stream.rows, slot), self._used[slot]))
            self._clock += 1
            self._used[stream.slot] = self._clock
            self._streams.append(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="companion-frames", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return stream

    def open_check(self) -> None:
        """Raise EngineBusy now if every slot is taken (``open`` checks again when the stream starts)."""
        with self._cond:
            if len(self._streams) >= self.max_batch:
                raise EngineBusy(self._streams[0].name, self.max_batch)

    def _cost(self, rows: torch.Tensor, slot: int) -> int:
        """Positions lost by starting ``rows`` in ``slot``: those to read, and those of the slot's record
        that would be overwritten (another conversation that comes back would read them again)."""
        shared = self.loop.reusable_prefix(rows, slot)
        return (len(rows) - shared) + (self.loop.lengths[slot] - shared)

    def leave(self, stream: Stream) -> None:
        """The consumer lets go of ``stream``; returns once the frame thread no longer uses it, so the
        slot's record is final when the consumer goes on."""
        with self._cond:
            stream.left = True
            self._cond.notify_all()
            if threading.current_thread() is self._thread:
                return  # a stream dropped and collected in the frame thread itself: it goes at the next frame
            while stream in self._streams:
                self._cond.wait()

    # ---- the frame thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._iterate()
        except BaseException as err:  # the loop itself broke: nobody may wait for frames that never come
            with self._cond:
                for s in list(self._streams):
                    self._drop(s, ("error", err))
                self._thread = None
            raise

    def _iterate(self) -> None:
        while True:
            with self._cond:
                for s in [s for s in self._streams if s.stopped()]:
                    self._drop(s, ("end", None))
                if not self._streams:
                    self._thread = None
                    return
                joining = [s for s in self._streams if s.state == "joining"]
                generating = [s for s in self._streams if s.state == "generating"]
            if joining:
                try:
                    self._prefill(joining[0], whole=not generating)
                except Exception as err:  # noqa: BLE001 - that stream's consumer hears it
                    with self._cond:
                        self._drop(joining[0], ("error", err))
            if generating:
                try:
                    self._frame(generating)
                except Exception as err:  # noqa: BLE001 - the frame of every stream in it failed
                    with self._cond:
                        for s in generating:
                            self._drop(s, ("error", err))

    def _drop(self, stream: Stream, event: tuple[str, Any]) -> None:
        """(Holding the lock.) ``stream`` is done: its slot is free, its consumer hears ``event``."""
        if stream in self._streams:
            self._streams.remove(stream)
            stream.state = "done"
            stream.events.put(event)
            self._cond.notify_all()

    def _prefill(self, stream: Stream, whole: bool) -> None:
        """One chunk of ``stream``'s prompt (all of it when ``whole``); it generates from the next frame."""
        loop, slot = self.loop, stream.slot
        if stream.prefill_start < 0:
            stream.prefill_start = loop.begin_prefill(stream.rows, slot)
        with torch.no_grad():
            while True:
                try:
                    hidden = loop.prefill_chunk(stream.rows, slot, stream.stopped)
                except Stopped:
                    with self._cond:
                        self._drop(stream, ("stopped", loop.lengths[slot] - stream.prefill_start))
                    return
                if hidden is not None or not whole:
                    break
        if hidden is not None:
            self.engine.sync()
            stream.hidden = hidden
            stream.events.put(("prefilled", len(stream.rows) - stream.prefill_start))
            with self._cond:
                if stream.options.max_frames <= 0:
                    self._drop(stream, ("end", None))
                else:
                    stream.state = "generating"

    def _frame(self, streams: list[Stream]) -> None:
        """One frame for every generating stream at once."""
        loop = self.loop
        size = self.max_batch  # one shape for every frame: see the module's doc
        by_slot: list[Stream | None] = [None] * size
        for s in streams:
            by_slot[s.slot] = s
        greedy = {s.sampler.greedy for s in streams}
        unit = None
        if self.engine.graphs is not None and len(greedy) == 1:
            unit = self.engine.graphs.batch_unit(size, greedy.pop(), self._loader(by_slot))
        for s in streams:
            s.sampler.begin_frame()
        frames, hidden = None, None
        if unit is not None:
            try:
                frames, hidden = self._replay(unit, by_slot)
            except Exception as err:  # noqa: BLE001 - graphs off; this frame again, eagerly, same noise
                assert self.engine.graphs is not None
                self.engine.graphs.replay_failed(err, unit)
                unit = None
        with torch.no_grad():
            if frames is None:
                rows = torch.zeros(size, 1, loop.lm_head.shape[1], dtype=loop.lm_head.dtype, device=loop.device)
                for s in streams:
                    assert s.hidden is not None
                    rows[s.slot] = s.hidden[0]
                frames = loop.depth_frame(rows, _Drawn([s.sampler if s else None for s in by_slot]))
            spoken = frames.any(dim=1).tolist()  # the one host sync per frame
            fed = [s is not None and spoken[b] and (unit is not None or s.made + 1 < s.options.max_frames)
                   for b, s in enumerate(by_slot)]  # fmt: skip
            if unit is None:
                hidden = loop.feed_rows(frames, fed)
            else:
                for b, f in enumerate(fed):
                    if f:
                        loop.record_frame(frames[b], b)
        assert hidden is not None
        with self._cond:
            for s in streams:
                if not spoken[s.slot]:
                    self._drop(s, ("end", None))
                    continue
                s.made += 1
                s.hidden = hidden[s.slot : s.slot + 1].clone()
                s.events.put(("frame", frames[s.slot].clone()))
                if s.made >= s.options.max_frames:
                    self._drop(s, ("end", None))

    def _loader(self, by_slot: list[Stream | None]) -> Callable[[GraphedFrame, int], None]:
        """Loads the streams' state into a unit for its self-check, the noise drawn from a seed."""

        def load(unit: GraphedFrame, seed: int) -> None:
            generator = torch.Generator(device=self.loop.device)
            generator.manual_seed(seed)
            self._load(unit, by_slot)
            for b, s in enumerate(by_slot):
                if s is not None:
                    self._set_row(unit, b, s, torch.empty_like(s.sampler.noise).uniform_(generator=generator))

        return load

    def _load(self, unit: GraphedFrame, by_slot: list[Stream | None]) -> None:
        """Point ``unit`` at the streams' states: hidden and position per row, padding at the scratch."""
        loop = self.loop
        hidden = torch.zeros_like(unit.hidden)
        positions = []
        for b, s in enumerate(by_slot):
            if s is not None:
                assert s.hidden is not None
                hidden[b] = s.hidden[0]
            positions.append(loop.lengths[b] if s is not None else loop.scratch)
        unit.load(hidden, positions)

    @staticmethod
    def _set_row(unit: GraphedFrame, row: int, stream: Stream, noise: torch.Tensor) -> None:
        sampler = unit.sampler
        assert not isinstance(sampler, Sampler)
        sampler.load(row, stream.options.temperature, stream.options.topk, noise)

    def _replay(self, unit: GraphedFrame, by_slot: list[Stream | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame of every row through ``unit``'s replay, with each stream's own noise."""
        self._load(unit, by_slot)
        for b, s in enumerate(by_slot):
            if s is not None:
                self._set_row(unit, b, s, s.sampler.noise)
        unit.sampler.begin_frame()
        unit.run()
        return unit.codes.clone(), unit.hidden


class _Drawn(RowSamplers):
    """RowSamplers whose streams already drew this frame's noise (``begin_frame`` draws nothing more)."""

    def begin_frame(self) -> None:
        self.row = 0
        self._noise = None
