"""The checks that need a GPU, in one run, printing one JSON object (full-size csm-1b, random weights).

    python benchmarks/gpu_check.py --json gpu.json          # on a CUDA machine (a few minutes)
    python benchmarks/gpu_check.py --dry-run                # anywhere: the same logic on the tiny model

1. ``self_check``: the first graphed turn runs the engine's own self-check (a few greedy frames replayed
   and run step by step); ``passed`` is whether graphs are still on afterwards (``off_reason`` if not).
2. ``exactness``: greedy codes of the graphed engine and of an eager engine on the same weights
   (bfloat16, a 10 s reference, ``--frames`` frames): equal frames and the first that differs. The
   replay attends over the full static cache with a position mask, so its low bits may differ from the
   eager path's; this records how much that matters in practice.
3. ``bench``: ``companion bench``'s numbers (RTF, ms per frame, first audio with a cold and a cached
   2-minute reference, prefill, the transformers baseline and the memory floor) with graphs on.

``--dry-run`` runs all three on the tiny test checkpoint on CPU with graphs replaced by the eager
replay the CPU tests use (``Capture``), to prove the script itself works where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import torch

from companion.engine import Engine, GenerationOptions
from companion.engine.bench import (
    REF_SHORT_FRAMES,
    TURNS,
    BenchOptions,
    finite,
    random_engine,
    reference,
    run_bench,
)
from companion.engine.cuda_graphs import CUDA_GRAPHS, Capture, FrameGraphs


def greedy_codes(engine: Engine, context: list, frames: int) -> torch.Tensor:
    """`(n, K)` greedy frames for TURNS[0] after ``context`` (on a cold cache)."""
    engine.loop.reset()
    options = GenerationOptions(temperature=0.0, topk=1, seed=0, max_frames=frames)
    chunks = [c.codes for c in engine.stream(context, 0, TURNS[0], options)]
    return torch.cat(chunks, dim=1).T if chunks else torch.zeros(0, engine.num_codebooks, dtype=torch.long)


def exactness(graphed: Engine, eager: Engine, context: list, frames: int) -> dict[str, Any]:
    a, b = greedy_codes(graphed, context, frames), greedy_codes(eager, context, frames)
    n = min(len(a), len(b))
    same = [bool(torch.equal(a[i], b[i])) for i in range(n)]
    return {
        "frames": n,
        "graphed_frames": len(a),
        "eager_frames": len(b),
        "equal": n == len(a) == len(b) and all(same),
        "equal_frames": sum(same),
        "first_difference": same.index(False) if False in same else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU checks: graph self-check, graph-vs-eager exactness, bench")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, eager replay (no GPU needed)")
    parser.add_argument("--frames", type=int, default=48, help="frames compared graphed vs eager")
    parser.add_argument("--bench-frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    if args.dry_run:
        device, dtype, size, capture = torch.device("cpu"), torch.float32, "tiny", Capture()
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run on a GPU machine, or use --dry-run"}))
        return 2
    else:
        device, dtype, size, capture = torch.device("cuda"), torch.bfloat16, "full", CUDA_GRAPHS
    out: dict[str, Any] = {"dry_run": args.dry_run, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        log(f"building the {size} model on {device}")
        engine, label = random_engine(size, device, dtype, work)
    out["model"] = label
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    # The engine random_engine made uses the default capture; the dry run hands it the eager one.
    engine.graphs = FrameGraphs(engine.loop, capture)
    eager = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len, capture=Capture())
    eager.graphs = None
    context = [reference(engine, REF_SHORT_FRAMES)]

    # 1. The self-check runs inside the first graphed turn.
    log("graph self-check")
    greedy_codes(engine, context, 4)
    out["self_check"] = {
        "passed": capture.off is None,
        "off_reason": capture.off,
        "units": sorted("greedy" if greedy else "sampled" for greedy in engine.graphs.units),
    }
    # 2. Graphed vs eager greedy codes.
    log(f"exactness: {args.frames} greedy frames, graphed vs eager")
    out["exactness"] = exactness(engine, eager, context, args.frames)
    out["exactness"]["graphs_on"] = capture.off is None
    # 3. The bench (graphs on, unless the self-check turned them off).
    if not args.skip_bench:
        opts = BenchOptions(frames=4 if args.dry_run else args.bench_frames, repeats=1 if args.dry_run else args.repeats)
        out["bench"] = finite(run_bench(engine, label, opts, lambda text: log(f"bench: {text}")))
        out["bench"]["graphs_on"] = capture.off is None
    out["seconds"] = time.perf_counter() - start
    text = json.dumps(out, indent=2, default=str)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0 if out["self_check"]["passed"] and out["exactness"]["frames"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
