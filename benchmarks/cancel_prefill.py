"""How fast a Ctrl-C stops a cold prefill of a 2-minute reference (full-size CSM-1B, random weights).

The turn runs in a worker thread, as in `companion chat`; the main thread sends itself SIGINT after a
delay and its handler sets the turn's cancel event, as the REPL's Ctrl-C does. Reported per delay: the
time from the signal to the turn having stopped, and how many prompt positions were prefilled (and
kept) by then. A full cold prefill of the same prompt is timed first, as the baseline.

    flock /work/wt/heavy.lock python benchmarks/cancel_prefill.py --json cancel.json

Heavy: builds the full-size model (about 3 GB in bfloat16); run one at a time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from companion.engine import Engine, GenerationOptions
from companion.engine.bench import REF_LONG_FRAMES, TURNS, random_engine, reference
from companion.engine.frames import PREFILL_CHUNK

OPTIONS = GenerationOptions(temperature=0.9, topk=50, seed=0, max_frames=2)


def cold_turn(engine: Engine, context: list, cancel: threading.Event | None) -> dict[str, Any]:
    """One turn on an empty cache; returns when it has stopped (finished or cancelled)."""
    engine.loop.reset()
    chunks = list(engine.stream(context, 0, TURNS[0], OPTIONS, cancel))
    stats = engine.last_stats
    return {"chunks": len(chunks), "prefill_positions": stats.prefill_positions, "prompt_positions": stats.prompt_positions}


def cancelled_turn(engine: Engine, context: list, delay_s: float) -> dict[str, Any]:
    """A cold turn in a worker thread, SIGINT after ``delay_s``: the latency from the signal to the stop."""
    cancel = threading.Event()
    result: dict[str, Any] = {}
    stopped = threading.Event()

    def worker() -> None:
        result.update(cold_turn(engine, context, cancel))
        result["stopped_at"] = time.perf_counter()
        stopped.set()

    sent: dict[str, float] = {}
    previous = signal.signal(signal.SIGINT, lambda *_: (sent.setdefault("handled", time.perf_counter()), cancel.set()))
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        if not stopped.wait(delay_s):
            sent["sent"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)
        thread.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    if "sent" not in sent:
        return {**result, "delay_s": delay_s, "latency_ms": None, "note": "finished before the signal"}
    return {
        **result,
        "delay_s": delay_s,
        "latency_ms": (result["stopped_at"] - sent["sent"]) * 1000,
        "handler_ms": (sent["handled"] - sent["sent"]) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a quick check of the script")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--delays", default="3,8,15", help="seconds after the start to send SIGINT")
    parser.add_argument("--unchunked", type=int, default=0, metavar="N",
                        help="also time N cold prefills in one chunk, alternating with chunked ones")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        engine, label = random_engine(args.size, torch.device("cpu"), dtype, tmp)
    context = [reference(engine, REF_LONG_FRAMES, seed=1)]
    print(f"{label}, {args.dtype}, {torch.get_num_threads()} threads, chunk {PREFILL_CHUNK}", file=sys.stderr)
    list(engine.stream([], 0, TURNS[1], OPTIONS))  # warm-up (first-call allocations)
    start = time.perf_counter()
    full = cold_turn(engine, context, None)
    full["seconds"] = time.perf_counter() - start
    print(f"cold prefill of {full['prompt_positions']} positions: {full['seconds']:.1f} s", file=sys.stderr)
    # What chunking costs: cold prefills in chunks and in one piece, alternating (load affects both).
    compare: dict[str, list[float]] = {"chunked_s": [full["seconds"]], "one_chunk_s": []}
    for _ in range(args.unchunked):
        for key, chunk in (("one_chunk_s", full["prompt_positions"]), ("chunked_s", PREFILL_CHUNK)):
            engine.loop.chunk = chunk
            start = time.perf_counter()
            cold_turn(engine, context, None)
            compare[key].append(time.perf_counter() - start)
            print(f"cold prefill, {key}: {compare[key][-1]:.1f} s", file=sys.stderr)
    engine.loop.chunk = PREFILL_CHUNK
    runs = []
    for delay in [float(d) for d in args.delays.split(",") if d]:
        run = cancelled_turn(engine, context, delay)
        runs.append(run)
        print(f"SIGINT after {delay:.1f} s: stopped {run['latency_ms']} ms later, "
              f"{run['prefill_positions']} positions kept", file=sys.stderr)
    out = {
        "model": label, "dtype": args.dtype, "threads": torch.get_num_threads(), "chunk": PREFILL_CHUNK,
        "cold_prefill": full, "cancels": runs, "chunking": compare,
        "latency_ms_max": max((r["latency_ms"] for r in runs if r["latency_ms"] is not None), default=None),
    }  # fmt: skip
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
