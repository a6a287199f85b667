"""A frame in fewer operations: the replayed frame's work compiled by torch.compile (inductor).

``GraphedFrame.step`` is about 5,300 tensor operations a sampled frame at full size, each its own
kernel; an rms-norm alone is 8. Compiled, neighbouring operations fuse into one kernel. The frame is
compiled as a few pieces rather than one, so tracing stays short (the start-up cost with a warm
compile cache) and one compiled piece serves every codebook:

- ``first``: codebook 0 from the backbone's hidden state, then the depth decoder's first two
  positions ``[backbone hidden, embed(c0)]``, as the step does;
- ``codebooks``: codebooks ``i`` and ``i + 1``, each from the depth decoder's state (head ``i - 1``,
  sampling), then its embedding through the depth decoder at the next position; ``i`` is a `(1,)`
  device tensor, so the same compiled piece runs for codebooks 1 .. K-2, two at a time (``codebook``,
  one at a time, takes the odd one out when K-2 is odd);
- ``last``: codebook K-1;
- ``feed``: the frame's embedding through the backbone at each row's position, into the unit's buffers.

Inductor's own CUDA graphs stay off: the compiled frame is recorded through the product's ``Capture``
like the step it replaces. On a CPU, where nothing records it, each piece is a call from Python: two
codebooks a call halve those calls, and inductor writes each piece's wrapper in C++ (``cpp_wrapper``)
rather than Python. Compiled code is kept on disk (inductor's caches, under companion's cache
directory), so only the first start on a machine pays for compilation.

The process's ``FUSION`` compiles beside generation: once the first turn that wants a kind of frame has
its first audio out, a thread compiles it on a twin of the frame loop (the same weights, caches of its
own: the compile's trial frame writes nothing a turn reads); the turn goes on without it (eagerly on a
CPU, with the step's own CUDA graph on CUDA). A later turn finds it compiled and records it, and the
self-check runs there, on the turn's state. So no start waits for the compiler, cold or warm.

Fused kernels round once where the step-by-step path rounds after every operation, so the fused frame
is not bit-equal to it: its self-check (``self_check.py``) runs the step-by-step frame from the same
state, made to pick the fused frame's codes, and holds the two within a tolerance per dtype.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "on", "off")


def compile_wanted(setting: str, device: torch.device) -> bool:
    """``engine.compile``: ``on``, ``off``, or ``auto`` (on for CUDA; off elsewhere: on a CPU the compiled
    frame is faster only for small models, and compiling costs minutes the first time)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"engine.compile is {setting!r}: use auto, on or off")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def use_compile_cache(cache_dir: Path) -> None:
    """Keep inductor's compiled code under ``cache_dir``/compiled (unless the user chose a place with
    ``TORCHINDUCTOR_CACHE_DIR``): the second start loads what the first compiled. Importing
    ``torch._dynamo`` (transformers does) sets that variable to inductor's default, a folder in the
    system's temporary directory: that value is no choice, and is replaced."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == _inductor_default():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "compiled")


def _inductor_default() -> str | None:
    """Where inductor keeps compiled code when nobody says (None if this torch does not tell)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def check_compiler_early(device: torch.device) -> threading.Thread | None:
    """On a CPU, start inductor's once-a-process check of which vector instructions its C++ code may use
    now, beside the model's loading: it builds a test program and loads it in a fresh Python (about a
    second, mostly waiting), which the first compile would otherwise wait for. Returns the thread."""
    if device.type != "cpu":
        return None
    check = threading.Thread(target=_check_vector_isa, name="companion-compiler-check", daemon=True)
    check.start()
    return check


def _check_vector_isa() -> None:
    with contextlib.suppress(Exception):  # only a head start: the first compile checks again if this failed
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        pick_vec_isa()


_told: set[str] = set()
COMPILED = ("fxgraph", "aotautograd")  # what inductor keeps of compiled code (the vector check keeps other things)


def first_compile_notice(background: bool = False) -> None:
    """Say so (once a process) before compiling into an empty compile cache: the first start on a
    machine compiles for a minute or more (``background``: while replies go on, slower; else the first
    reply waits for it)."""
    directory = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not directory or directory in _told or any((Path(directory) / name).is_dir() for name in COMPILED):
        return
    _told.add(directory)
    if background:
        log.warning("compiling the speech model's frame step for this machine while it speaks (the first start "
                    "only: a minute or more, and replies are slower until it is done; later starts reuse it, and "
                    "engine.compile: off skips it)")
    else:
        log.warning("compiling the speech model's frame step for this machine (the first start only: a minute or "
                    "more; later starts reuse it, and engine.compile: off skips it)")




Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]


class Compiling:
    """One kind of frame compiling beside generation: ``work`` run in a thread; ``done`` is set when it
    has finished, ``error`` is what it raised (None: compiled). A process that ends while the thread
    lives waits for it (``_finish_compiles``)."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name="companion-compile", daemon=True)
        _started[:] = [job for job in _started if job.thread.is_alive()]  # the exit handler's: live ones only
        _started.append(self)
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as err:  # said by the turn that finds it (compiling then goes off)
            self.error = err
        finally:
            self.done.set()


_started: list[Compiling] = []


@atexit.register
def _finish_compiles() -> None:
    """At exit, wait for compile threads to end, before the interpreter shuts down: a thread that ends
    (dropping what its work held, tensors included) after that aborts the process ("terminate called
    without an active exception"). Ctrl-C while waiting ends the process at once."""
    alive = [job for job in _started if job.thread.is_alive()]
    if not alive:
        return
    try:
        if not all(job.done.is_set() for job in alive):
            log.warning("finishing the speech model's frame compile before exiting (a minute at most, on a "
                        "first start; Ctrl-C quits now)")
        for job in alive:
            job.thread.join()
    except KeyboardInterrupt:
        sys.stderr.flush()
        os._exit(130)


class Fusion:
    """Whether frames are compiled, for as long as this object lives (the process's is ``FUSION``):
    ``off`` says why not, once compiling or a fused self-check failed. ``compiler`` turns each piece
    into its compiled form (default: torch.compile with inductor; the tests hand in others).
    ``background``: compile beside generation (in a thread) rather than at a turn's first frame."""

    def __init__(self, compiler: Compiler | None = None, background: bool = False) -> None:
        self.off: str | None = None
        self.compiler = compiler
        self.background = background
        self._jobs: list[Compiling] = []

    def start(self, work: Callable[[], None]) -> Compiling:
        """Compile with ``work`` in a thread."""
        self._jobs = [job for job in self._jobs if not job.done.is_set()]
        job = Compiling(work)
        self._jobs.append(job)
        return job

    @property
    def busy(self) -> bool:
        """Whether something compiles now (in a thread). Nothing is recorded meanwhile: on CUDA a
        recording would meet the compile's own work on the device."""
        return any(not job.done.is_set() for job in self._jobs)


FUSION = Fusion(background=True)


class FusedStep:
    """The compiled pieces of one unit's frame (``unit`` is a ``GraphedFrame``): ``__call__`` does what
    ``unit.step`` does, in fewer kernels. Compilation happens at the first call (the warm-up)."""

    def __init__(self, unit: Any, compiler: Compiler | None = None) -> None:
        self.unit = unit
        loop = unit.loop
        rows, device = unit.batch, loop.device
        compile_ = compiler or (_inductor_cpu if device.type == "cpu" else _inductor)
        self.first = compile_(self._first)
        self.codebooks = compile_(self._codebooks)
        self.codebook = compile_(self._codebook)  # compiled at its first call: only when K-2 is odd
        self.last = compile_(self._last)
        self.feed = compile_(self._feed)
        # Codebook indices and depth positions as static device tensors (one compiled piece for all).
        self.index = [torch.tensor([i], device=device) for i in range(loop.num_codebooks)]
        self.at = [torch.full((rows,), i, dtype=torch.long, device=device) for i in range(loop.num_codebooks + 1)]

    def __call__(self) -> None:
        unit, loop = self.unit, self.unit.loop
        K = loop.num_codebooks
        c0, h = self.first(unit.hidden, self.index[0])
        codes = [c0]
        for i in range(1, K - 2, 2):
            ci, cj, h = self.codebooks(h, self.index[i], self.at[i + 1], self.index[i + 1], self.at[i + 2])
            codes += [ci, cj]
        if K % 2 == 1:  # K-2 codebooks in the middle, one of them left over
            ci, h = self.codebook(h, self.index[K - 2], self.at[K - 1])
            codes.append(ci)
        codes.append(self.last(h, self.index[K - 1]))
        self.feed(codes, unit.codes, unit.hidden, unit.pos)

    # ---- the pieces (plain functions of tensors; each is compiled once) --------------------------

    def _first(self, hidden: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.unit.loop
        c0 = self.unit.sampler.pick(F.linear(hidden[:, -1], loop.lm_head), row)
        x = torch.cat([hidden, F.embedding(c0[:, None], loop.depth_embed)], dim=1)
        h = loop.depth.forward(F.linear(x, loop.projector), 0)[:, -1:]
        return c0, h.clone(memory_format=torch.contiguous_format)  # as ``codebook`` returns it: one compile

    def _codebooks(self, h: torch.Tensor, i: torch.Tensor, at: torch.Tensor, j: torch.Tensor,
                   at_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        ci, h = self._codebook(h, i, at)
        cj, h = self._codebook(h, j, at_j)
        return ci, cj, h

    def _codebook(self, h: torch.Tensor, i: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loop = self.unit.loop
        ci = self._last(h, i)
        e = F.embedding(ci[:, None] + i * loop.vocab, loop.depth_embed)
        return ci, loop.depth.forward_at(F.linear(e, loop.projector), at)

    def _last(self, h: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        loop = self.unit.loop
        return self.unit.sampler.pick(F.linear(h[:, -1], loop.heads.index_select(0, i - 1)[0].T), i)

    def _feed(self, codes: list[torch.Tensor], frame: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor) -> None:
        """The frame's codes into ``frame``, its embedding through the backbone into ``hidden``, ``pos``
        advanced (padding rows stay at the scratch position): the unit's buffers, written in place."""
        loop = self.unit.loop
        frame.copy_(torch.stack(codes, dim=1))
        hidden.copy_(loop.backbone.forward_at(loop.embed_frame_rows(frame), pos))
        pos.add_(1).clamp_(max=loop.scratch)


def _inductor(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _inductor_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """On a CPU, each compiled piece's wrapper in C++: the per-kernel cost of a Python wrapper is
    much of a small model's frame."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
