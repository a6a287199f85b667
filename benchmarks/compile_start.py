"""What compiled frames cost at start: the first start on a machine (compiling) and later ones (cached).

    python benchmarks/compile_start.py                         # tiny checkpoint, CPU, float32
    python benchmarks/compile_start.py --size full --device cuda --dtype bfloat16

Each start is a fresh process: build the engine (random weights), speak one short turn, and time from
the process's start to the turn's first audio. Starts, in this order (after one not counted, which
reads the libraries into the OS's file cache; not with ``--quick``): without compilation; compiled
with an empty compile cache (cold); compiled again with the cache the cold start wrote (warm); then
without and warm once more (so the two compared are interleaved). The compile cache is a temporary
directory (``TORCHINDUCTOR_CACHE_DIR``); nothing of the user's is touched.

Frames compile beside generation (``fused.py``), so a compiled start also says when the compile was
done and when a second turn, started then, spoke with compiled frames.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One start: engine, one turn, the seconds to its first audio (printed as JSON)."""
    import torch

    from companion.engine import GenerationOptions
    from companion.engine.bench import random_engine
    from companion.engine.bench import reference as make_reference

    imported = time.monotonic() - START
    with tempfile.TemporaryDirectory() as work:
        engine, _ = random_engine(args.size, torch.device(args.device), getattr(torch, args.dtype), work,
                                  max_seq_len=1024, compile=args.child)  # fmt: skip
    built = time.monotonic() - START
    ref = make_reference(engine, 25)
    options = GenerationOptions(temperature=0.9, topk=50, seed=1, max_frames=4)
    stream = engine.stream([ref], 0, "Hello there, how are you today?", options)
    next(stream)
    first_audio = time.monotonic() - START
    for _ in stream:  # the turn goes on (a compile starts once its first audio is out)
        pass
    engine.wait_compiled()
    compiled_s = time.monotonic() - START
    stream = engine.stream([ref], 0, "And how was your day?", options)
    next(stream)
    compiled_audio = time.monotonic() - START
    stream.close()
    fusion = engine.fusion
    print(json.dumps({"compile": args.child, "imported_s": imported, "built_s": built, "first_audio_s": first_audio,
                      "compiled_s": compiled_s, "compiled_audio_s": compiled_audio,
                      "compiled": fusion is not None and fusion.off is None and bool(engine.graphs and engine.graphs.units),
                      "off": fusion.off if fusion is not None else None}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="three starts: without, cold, warm")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        # "prime": a first start, not counted, that reads the libraries into the OS's file cache.
        starts = [("off", "off"), ("cold", "on"), ("warm", "on")]
        starts = starts if args.quick else [("prime", "off"), *starts, ("off", "off"), ("warm", "on")]
        for label, mode in starts:
            cmd = [sys.executable, __file__, "--child", mode, "--size", args.size, "--device", args.device,
                   "--dtype", args.dtype]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1]) | {"start": label}
            runs.append(run)
            print(f"{label:5} first audio {run['first_audio_s']:7.2f} s after the process started "
                  f"(engine built at {run['built_s']:.2f} s); compiled by {run['compiled_s']:.2f} s, a turn then "
                  f"spoke at {run['compiled_audio_s']:.2f} s (compiled frames used: {run['compiled']})", flush=True)
    off = statistics.median(r["first_audio_s"] for r in runs if r["start"] == "off")
    warm = statistics.median(r["first_audio_s"] for r in runs if r["start"] == "warm")
    cold = next(r["first_audio_s"] for r in runs if r["start"] == "cold")
    ready = {label: statistics.median(r["compiled_s"] - r["first_audio_s"] for r in runs if r["start"] == label)
             for label in ("cold", "warm")}  # fmt: skip
    # From the engine built to the first audio: the part of a start that compiling could lengthen.
    after_build = {label: statistics.median(r["first_audio_s"] - r["built_s"] for r in runs if r["start"] == label)
                   for label in ("off", "cold", "warm")}  # fmt: skip
    summary = {"size": args.size, "device": args.device, "dtype": args.dtype, "runs": runs,
               "cold_minus_off_s": cold - off, "warm_minus_off_s": warm - off,
               "compiled_after_first_audio_s": ready, "first_audio_after_build_s": after_build}  # fmt: skip
    print(f"compiling costs {cold - off:.2f} s of first audio at the first start and {warm - off:.2f} s at later ones "
          f"(medians: without {off:.2f} s, warm {warm:.2f} s); the compile was done {ready['cold']:.2f} s (cold) "
          f"and {ready['warm']:.2f} s (warm) after the first audio; first audio after the engine was built: "
          f"{after_build['off']:.2f} s without, {after_build['cold']:.2f} s cold, {after_build['warm']:.2f} s warm")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
