"""``companion bench --streams 1,2,4,8``: how many frames per second several streams at once make.

For each count N, an engine of ``max_batch`` N on the same weights (N = 1: the one-stream engine, the
baseline), and N streams (each its own thread, as ``companion serve`` runs its listeners) speaking a
different short turn after the same 10 s reference (cached in every slot by a warm-up), each for
``frames`` frames, with Mimi decode, as users hear them. (An engine of N runs every frame at N rows,
so N streams are measured in an engine of N, as a server set to ``max_batch`` N serves N listeners.)
The counts are measured in rounds (1, 2, 4, 8, 1, 2, 4, 8, ...), so load that comes and goes on a
busy machine hits every count alike; each round's N-stream aggregate over its 1-stream aggregate is a
pair, and the speed-up reported is the median of the pairs.

- ``aggregate_frames_per_s``: all streams' frames / the time from the first stream's start to the
  last one's end (best round);
- ``ms_per_frame_per_stream``: that time / ``frames``: how fast each stream's frames come;
- ``rtf_per_stream``: that per frame / 80 ms of audio (below 1: every stream faster than real time).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from companion.engine.bench import FRAME_MS, REF_SHORT_FRAMES, TURNS, BenchOptions, reference
from companion.engine.engine import Engine
from companion.engine.types import GenerationOptions, Segment


def parse_counts(text: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8]; ValueError with the reason otherwise."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--streams takes whole numbers separated by commas, like 1,2,4,8 (got {text!r})") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--streams takes counts of at least 1, like 1,2,4,8 (got {text!r})")
    return sorted(set(counts))


def run_streams(engine: Engine, n: int, frames: int, options: GenerationOptions, ref: Segment) -> float:
    """Seconds from starting ``n`` streams at once (each its own thread) until all have ended."""
    failures: list[BaseException] = []

    def speak(i: int) -> None:
        opts = GenerationOptions(options.temperature, options.topk, seed=i, max_frames=frames)
        try:
            made = sum(c.codes.shape[1] for c in engine.stream([ref], 0, f"{TURNS[i % len(TURNS)]} ({i})", opts))
            if made != frames:
                raise RuntimeError(f"stream {i} ended after {made} of {frames} frames")
        except BaseException as err:  # noqa: BLE001 - handed back to the caller
            failures.append(err)

    threads = [threading.Thread(target=speak, args=(i,), name=f"bench-stream-{i}") for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise failures[0]
    return seconds


def streams_section(engine: Engine, counts: list[int], opts: BenchOptions,
                    log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Every count measured ``opts.repeats`` times in rounds, each on an engine of its own size made on
    ``engine``'s weights and capture (``engine`` itself for its own size); see the module doc."""
    engines = {n: engine if engine.max_batch == n else engine.sibling(n) for n in counts}
    ref = reference(engine, REF_SHORT_FRAMES)
    options = GenerationOptions(opts.temperature, opts.topk)
    log("streams: warm-up (every slot reads the reference once; frames compiled meanwhile are waited for)")
    for n in counts:
        run_streams(engines[n], n, 2, options, ref)
        engines[n].wait_compiled()
        run_streams(engines[n], n, 2, options, ref)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(opts.repeats):
        for n in counts:
            seconds[n].append(run_streams(engines[n], n, opts.frames, options, ref))
            log(f"streams: round {r + 1} of {opts.repeats}: {n} at once, {n * opts.frames / seconds[n][-1]:.2f} frames/s")
    rows = []
    for n in counts:
        best = min(seconds[n])
        row: dict[str, Any] = {
            "streams": n,
            "aggregate_frames_per_s": n * opts.frames / best,
            "ms_per_frame_per_stream": best * 1000 / opts.frames,
            "rtf_per_stream": best * 1000 / opts.frames / FRAME_MS,
            "seconds_runs": seconds[n],
        }
        if 1 in seconds:  # aggregate of n over aggregate of 1, round by round
            pairs = [n * one / s for s, one in zip(seconds[n], seconds[1], strict=True)]
            row["aggregate_over_one_pairs"] = pairs
            row["aggregate_over_one"] = statistics.median(pairs)
        rows.append(row)
    return {"streams": rows, "frames": opts.frames, "repeats": opts.repeats}
