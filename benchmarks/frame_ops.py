"""How many tensor operations one replayed frame is: the count behind the GPU numbers in docs/benchmarks.md.

    python benchmarks/frame_ops.py              # full size, bfloat16, on the CPU (about a minute)
    python benchmarks/frame_ops.py --tiny       # the tiny test checkpoint, float32 (seconds)

Runs ``GraphedFrame.step`` (the unit a CUDA graph records) once, greedy and sampled, at the scratch
position, and counts the operations torch dispatches, views apart (a view launches no kernel). On a
GPU each counted operation is roughly one kernel in the replay.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from companion.engine.bench import random_engine
from companion.engine.cuda_graphs import new_unit


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoint instead of full size")
    args = parser.parse_args()
    size, dtype = ("tiny", torch.float32) if args.tiny else ("full", torch.bfloat16)
    with tempfile.TemporaryDirectory() as work:
        engine, label = random_engine(size, torch.device("cpu"), dtype, work)
    loop = engine.loop
    for greedy in (True, False):
        unit = new_unit(loop, greedy)
        unit.warm_up()
        unit.load(torch.zeros_like(unit.hidden), loop.scratch)
        count = OpCount()
        with torch.no_grad(), count:
            unit.step()
        top = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in count.ops.most_common(8))
        kind = "greedy" if greedy else "sampled"
        print(
            f"{label}, {kind} frame: {sum(count.ops.values())} operations ({count.views} views apart); {top}"
        )


if __name__ == "__main__":
    main()
