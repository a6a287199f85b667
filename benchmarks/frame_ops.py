"""How many tensor operations one replayed frame is: the count behind the GPU numbers in docs/benchmarks.md.

    python benchmarks/frame_ops.py              # full size, bfloat16, on the CPU (about a minute)
    python benchmarks/frame_ops.py --tiny       # the tiny test checkpoint, float32 (seconds)
    python benchmarks/frame_ops.py --compiled   # also the compiled frame (engine.compile): its kernels

Runs ``GraphedFrame.step`` (the unit a CUDA graph records) once, greedy and sampled, at the scratch
position, and counts the operations torch dispatches, views apart (a view launches no kernel). On a
GPU each counted operation is roughly one kernel in the replay.

With ``--compiled``, the frame's compiled pieces (``companion/engine/fused.py``) are compiled afresh
(a temporary compile cache) on the device, and the kernels a frame launches are counted from the code
inductor wrote: each piece's kernel calls (its own fused kernels, and library calls such as matrix
products and attention), times the calls of that piece per frame, plus the operations between pieces.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from companion.engine.bench import random_engine
from companion.engine.fused import FusedStep, _inductor
from companion.engine.unit import GraphedFrame, new_unit


class OpCount(TorchDispatchMode):
    """Counts dispatched operations by name, views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.is_view or func is torch.ops.aten._unsafe_view.default:  # aliasing: no kernel
            self.views += 1
        else:
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


# A kernel call in inductor's wrapper code: its own kernels (C++ on a CPU, Triton on a GPU), library
# kernels (extern_kernels.mm, ...) and operations it leaves to torch (torch.ops.aten.topk, ...).
KERNEL_CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+\(|\w+\.run\(|extern_kernels\.\w+\(|torch\.ops\.\w+\.\w+|aten\.\w+)", re.M)


def kernel_calls(source: str) -> int:
    """Kernel calls in the ``call`` function of one compiled graph's wrapper code."""
    body = source[source.index("def call(") :]
    end = body.find("\ndef ", 1)
    return len(KERNEL_CALL.findall(body if end < 0 else body[:end]))


def compiled_kernels(unit: GraphedFrame) -> tuple[int, dict[str, int]]:
    """Kernels of one compiled frame: each piece's calls in the code inductor wrote, times its calls per
    frame, plus the operations ``FusedStep.__call__`` runs between pieces (counted as dispatched)."""
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        _, sources = run_and_get_code(unit.fast)  # compiles the pieces, in the order they are first called
    per_call = [kernel_calls(src) for src in sources]
    K = unit.loop.num_codebooks
    calls = {"first": 1, "codebooks": (K - 2) // 2, "codebook": (K - 2) % 2, "last": 1, "feed": 1}
    names = [name for name, n in calls.items() if n]  # the order they are first called
    if len(per_call) != len(names):
        raise SystemExit(f"expected {len(names)} compiled pieces, got {len(per_call)}")
    fused = unit.fast
    assert isinstance(fused, FusedStep)
    glue = OpCount()  # the operations between pieces (the pieces replaced by stand-ins that run nothing)
    pieces = fused.first, fused.codebooks, fused.codebook, fused.last, fused.feed
    code = torch.zeros(unit.batch, dtype=torch.long, device=unit.hidden.device)
    depth = torch.zeros(unit.batch, 1, unit.loop.projector.shape[0], dtype=unit.hidden.dtype, device=code.device)
    fused.first = fused.codebook = lambda *a: (code, depth)
    fused.codebooks = lambda *a: (code, code, depth)
    fused.last, fused.feed = (lambda *a: code), (lambda *a: None)
    try:
        with torch.no_grad(), glue:
            fused()
    finally:
        fused.first, fused.codebooks, fused.codebook, fused.last, fused.feed = pieces
    table = {name: n for name, n in zip(names, per_call, strict=True)}
    table["between pieces"] = sum(glue.ops.values())
    total = sum(n * calls[name] for name, n in zip(names, per_call, strict=True)) + table["between pieces"]
    return total, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint instead of full size")
    parser.add_argument("--compiled", action="store_true", help="also count the compiled frame's kernels")
    parser.add_argument("--device", default="cpu", help="where to build the model (default cpu; cuda on a GPU)")
    args = parser.parse_args()
    size, dtype = ("tiny", torch.float32) if args.tiny else ("full", torch.bfloat16)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        engine, label = random_engine(size, device, dtype, work)
    loop = engine.loop
    for greedy in (True, False):
        kind = "greedy" if greedy else "sampled"
        unit = new_unit(loop, greedy)
        unit.warm_up()
        unit.load(torch.zeros_like(unit.hidden), loop.scratch)
        count = OpCount()
        with torch.no_grad(), count:
            unit.step()
        top = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in count.ops.most_common(8))
        print(
            f"{label}, {kind} frame: {sum(count.ops.values())} operations ({count.views} views apart); {top}"
        )
        if args.compiled:
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # compiled afresh: the code is written
                fused = new_unit(loop, greedy)
                fused.fuse(_inductor)  # with inductor's Python wrapper, whose kernel calls are counted (on a GPU too)
                fused.load(torch.zeros_like(fused.hidden), loop.scratch)
                total, table = compiled_kernels(fused)
            pieces = ", ".join(f"{name} {n}" for name, n in table.items())
            print(f"{label}, {kind} frame, compiled: {total} kernels (per call: {pieces})")


if __name__ == "__main__":
    main()
