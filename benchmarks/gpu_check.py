"""The checks that need a GPU, in one run, printing one JSON object.

    python benchmarks/gpu_check.py --json gpu.json          # on a CUDA machine (a few minutes)
    python benchmarks/gpu_check.py --dry-run                # anywhere: the same logic on the tiny model

Sections (each runs even if an earlier one failed; a failure is recorded as ``error`` with its traceback,
and the JSON file is rewritten after every section, so a run cut short keeps what it measured):

1. ``tiny``: the tiny test checkpoint in float32 with real CUDA graphs (its own capture object): the
   self-check result and greedy codes graphed vs eager. In float32 they must be equal: this isolates
   the graph logic from bfloat16 rounding.
2. ``float32``: the same at full size (csm-1b architecture, random weights, float32, its own capture).
3. ``self_check``: full size in bfloat16 (what users run): the first graphed turn runs the engine's own
   self-check; ``passed`` is whether graphs are still on afterwards.
4. ``exactness``: greedy codes of the graphed engine and of an eager engine on the same weights (a 10 s
   reference, ``--frames`` frames): equal frames and the first that differs. The replay attends over
   the full static cache with a position mask, so in bfloat16 its low bits may differ from the eager
   path's. ``eager_vs_transformers`` compares the eager engine with transformers' own ``generate``
   (greedy) on the same prompt: the size of the difference that bfloat16 alone makes between two
   correct implementations (every exactness section has it).
   ``sampled``: the same for sampled frames (temperature 0.9, top-k 50, one seed): both paths draw the
   same noise, so in float32 the codes must be equal (in bfloat16 they may part where greedy does).
   ``teacher_forced``: along the eager greedy frames, codebook-0 logits of the eager step and of the
   graph's step (run eagerly), each against a float32 copy of the model: whether the graph's step is
   as close to float32 as the eager one (the divergence above is then bfloat16 rounding, not a bug).
5. ``graph_speed``: ms per frame (sampling) with graphs and without, same prompt and weights.
6. ``bench``: ``companion bench``'s numbers (RTF, ms per frame, first audio with a cold and a cached
   2-minute reference, prefill, the transformers baseline and the memory floor) with graphs on.
7. ``streams``: several streams through one frame loop (an engine of ``max_batch`` 8 on the same
   weights: every frame at 8 rows, one graph unit per kind of sampling, self-checked at its first
   use): a stream beside three others against the same stream alone in that engine (greedy codes:
   every frame equal, in any dtype, since every frame has the same shape), then ``companion bench
   --streams 1,2,4,8``'s numbers (each count in an engine of its size, 1 the one-stream engine:
   aggregate frames/s, ms per frame and RTF of each stream, speed-up over one stream).

8. ``compiled``: compiled frames (``engine.compile``, ``companion/engine/fused.py``) on the same weights,
   with their own graph capture: whether the fused self-check passed (and why not); kernels a sampled
   compiled frame launches (CUDA kernels in a profile of one fused step); interleaved ms per frame of
   the fused engine, the unfused graphed one and the eager one; transformers' ``generate`` eager and
   with static caches and ``torch.compile``d backbone and depth decoder (the csm-1b model card's fast
   path); the fused engine's ``companion bench`` (RTF, floor, first audio with a 2-minute reference);
   in float32 on the tiny checkpoint, fused greedy codes against eager (must be equal); and the first
   and second start with compilation (``benchmarks/compile_start.py``, fresh processes, full size).

``--dry-run`` runs it all on the tiny checkpoint on CPU with graphs replaced by the eager replay the
CPU tests use (``Capture``), to prove the script itself works where there is no GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from companion.engine import Engine, GenerationOptions
from companion.engine.bench import (
    REF_SHORT_FRAMES,
    TURNS,
    BenchOptions,
    baseline_ms_per_frame,
    engine_run,
    finite,
    prompt_embeds,
    random_engine,
    reference,
    run_bench,
)
from companion.engine.bench_streams import streams_section
from companion.engine.cuda_graphs import CUDA_GRAPHS, Capture, CudaGraphCapture, FrameGraphs
from companion.engine.fused import Fusion


def greedy_codes(engine: Engine, context: list, frames: int) -> torch.Tensor:
    """`(n, K)` greedy frames for TURNS[0] after ``context`` (on a cold cache)."""
    engine.loop.reset()
    options = GenerationOptions(temperature=0.0, topk=1, seed=0, max_frames=frames)
    chunks = [c.codes for c in engine.stream(context, 0, TURNS[0], options)]
    return torch.cat(chunks, dim=1).T if chunks else torch.zeros(0, engine.num_codebooks, dtype=torch.long)


def sampled_codes(engine: Engine, context: list, frames: int, seed: int = 7) -> torch.Tensor:
    """`(n, K)` seeded sampled frames for TURNS[0] after ``context`` (on a cold cache)."""
    engine.loop.reset()
    options = GenerationOptions(temperature=0.9, topk=50, seed=seed, max_frames=frames)
    chunks = [c.codes for c in engine.stream(context, 0, TURNS[0], options)]
    return torch.cat(chunks, dim=1).T if chunks else torch.zeros(0, engine.num_codebooks, dtype=torch.long)


def exactness(graphed: Engine, eager: Engine, context: list, frames: int) -> dict[str, Any]:
    """Greedy codes replayed vs eager (and eager vs transformers' generate, the same prompt)."""
    a, b = greedy_codes(graphed, context, frames), greedy_codes(eager, context, frames)
    out = agreement(a, b)
    out["eager_vs_transformers"] = agreement(b, transformers_greedy(eager, context, frames))
    return out


@torch.inference_mode()
def transformers_greedy(engine: Engine, context: list, frames: int) -> torch.Tensor:
    """`(n, K)` frames from transformers' ``generate`` (greedy backbone and depth decoder) on the same
    prompt as ``greedy_codes``, end frame and what follows dropped. Codes Mimi cannot decode (csm-1b:
    2048-2050 of its 2051) are suppressed, as the engine never picks them: with random weights they
    are as likely as any other, and ``generate`` would pick them."""
    embeds = prompt_embeds(engine, engine.prompt.prompt_rows(context, 0, TURNS[0]))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=engine.device)
    limit = engine.decodable_codes
    undecodable = list(range(limit, engine.model.config.vocab_size)) if limit is not None else None
    out = engine.model.generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=False, depth_decoder_do_sample=False,
        suppress_tokens=undecodable, depth_decoder_suppress_tokens=undecodable, max_new_tokens=frames,
    )[0]  # fmt: skip
    ends = (out == 0).all(dim=1).nonzero()
    return out[: int(ends[0, 0])] if len(ends) else out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """How two `(n, K)` greedy code sequences agree, frame by frame."""
    n = min(len(a), len(b))
    same = [bool(torch.equal(a[i].cpu(), b[i].cpu())) for i in range(n)]
    return {
        "frames": n,
        "frames_a": len(a),
        "frames_b": len(b),
        "equal": n == len(a) == len(b) and all(same),
        "equal_frames": sum(same),
        "first_difference": same.index(False) if False in same else None,
    }


@torch.no_grad()
def backbone_logits(engine: Engine, context: list, codes: torch.Tensor, at: bool) -> torch.Tensor:
    """`(n, V)` codebook-0 logits (float32) along the given frames (teacher forcing): after the prompt,
    then after feeding each frame through the backbone's eager step (``forward``) or the graph's step
    (``forward_at``, run eagerly). Everything else the two paths share."""
    loop = engine.loop
    loop.reset()
    hidden, _ = loop.prefill(engine.prompt.prompt_rows(context, 0, TURNS[0]))
    assert hidden is not None
    logits = [F.linear(hidden[:, -1], loop.lm_head).float()]
    for frame in codes[:-1].to(loop.device):
        if at:
            pos = torch.tensor([loop.length], device=loop.device)
            hidden = loop.backbone.forward_at(loop.embed_frames(frame[None]), pos)
            loop.record_frame(frame)
        else:
            hidden = loop.feed(frame)
        logits.append(F.linear(hidden[:, -1], loop.lm_head).float())
    loop.reset()
    return torch.cat(logits)


def teacher_forced(engine: Engine, frames: int) -> dict[str, Any]:
    """How far the eager and the graph step each are from a float32 copy of the model, along the same
    frames: codebook-0 argmax agreement and logit error relative to the logits' spread."""
    context = [reference(engine, REF_SHORT_FRAMES)]
    eager = eager_twin(engine)
    codes = greedy_codes(eager, context, frames)
    wide = Engine(copy.deepcopy(engine.model).float(), engine.processor, "float32 copy", engine.max_seq_len,
                  capture=Capture())  # fmt: skip
    wide.graphs = None
    truth = backbone_logits(wide, context, codes, at=False)
    out: dict[str, Any] = {"frames": len(codes), "logit_spread": float(truth.std())}
    paths = {
        "eager_step": backbone_logits(eager, context, codes, at=False),
        "graph_step": backbone_logits(eager, context, codes, at=True),
        "graph_step_float32": backbone_logits(wide, context, codes, at=True),
    }
    for name, logits in paths.items():
        error = (logits - truth).abs()
        out[name] = {
            "argmax_agrees": float((logits.argmax(-1) == truth.argmax(-1)).float().mean()),
            "max_error_over_spread": float(error.max() / truth.std()),
            "mean_error_over_spread": float(error.mean() / truth.std()),
        }
    del wide
    return out


def eager_twin(engine: Engine) -> Engine:
    """An engine on the same weights that never replays (its own cache)."""
    twin = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len, capture=Capture())
    twin.graphs = None
    return twin


def graphed_check(engine: Engine, capture: Capture, frames: int) -> dict[str, Any]:
    """Self-check (inside the first graphed turn) and graphed-vs-eager greedy codes."""
    engine.graphs = FrameGraphs(engine.loop, capture)
    context = [reference(engine, REF_SHORT_FRAMES)]
    greedy_codes(engine, context, 4)
    out: dict[str, Any] = {
        "self_check": {
            "passed": capture.off is None,
            "off_reason": capture.off,
            "units": sorted("greedy" if greedy else "sampled" for _, greedy, _ in engine.graphs.units),
        }
    }
    out["exactness"] = exactness(engine, eager_twin(engine), context, frames)
    out["exactness"]["graphs_on"] = capture.off is None
    # Sampled: the sampled unit's self-check runs in its first turn; then graphed vs eager, one seed.
    out["sampled"] = agreement(sampled_codes(engine, context, frames), sampled_codes(eager_twin(engine), context, frames))
    out["sampled"]["graphs_on"] = capture.off is None
    out["self_check"]["units"] = sorted("greedy" if greedy else "sampled" for _, greedy, _ in engine.graphs.units)
    return out


def graph_speed(engine: Engine, opts: BenchOptions) -> dict[str, Any]:
    """Best ms per frame (sampling) with graphs on and off, on the same prompt."""
    context = [reference(engine, REF_SHORT_FRAMES)]
    out: dict[str, Any] = {}
    for name, target in (("graphed", engine), ("eager", eager_twin(engine))):
        engine_run(target, context, TURNS[0], 2, opts)  # warm-up (and capture for the graphed one)
        runs = [
            engine_run(target, context, TURNS[0], opts.frames, opts, seed=i)[0] for i in range(opts.repeats)
        ]
        out[f"{name}_ms_per_frame"] = min(s.ms_per_frame for s in runs)
        out[f"{name}_frames"] = [s.frames for s in runs]
    out["eager_over_graphed"] = out["eager_ms_per_frame"] / max(out["graphed_ms_per_frame"], 1e-9)
    return out


def streams_check(engine: Engine, capture: Capture, args: argparse.Namespace, opts: BenchOptions,
                  log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """A stream beside three others vs alone, and the aggregate speed of 1, 2, 4 and 8 streams."""
    import threading

    many = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len, capture=capture, max_batch=8)
    context = [reference(engine, REF_SHORT_FRAMES)]
    frames = min(args.frames, 48)
    alone = greedy_codes(many, context, frames)
    results: dict[int, torch.Tensor] = {}

    def speak(i: int) -> None:
        options = GenerationOptions(temperature=0.0 if i == 0 else 0.9, topk=50, seed=i, max_frames=frames)
        text = TURNS[i % len(TURNS)]
        results[i] = torch.cat([c.codes for c in many.stream(context, 0, text, options)], dim=1)

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict[str, Any] = {"beside_three_vs_alone": agreement(results[0].T, alone)}
    bench_opts = BenchOptions(frames=4 if args.dry_run else 32, repeats=1 if args.dry_run else opts.repeats)
    out.update(streams_section(many, [1, 2, 4, 8], bench_opts, lambda t: log(f"streams: {t}")))
    out["graphs_on"] = capture.off is None
    out["batch_units"] = sorted(f"{n} {'greedy' if g else 'sampled'}" for n, g, _ in (many.graphs.units if many.graphs else {}))
    return out


def compiled_check(engine: Engine, args: argparse.Namespace, opts: BenchOptions,
                   log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Compiled frames against unfused graphs, eager, and transformers eager and compiled (section 8)."""
    import statistics
    import subprocess

    capture = Capture() if args.dry_run else CudaGraphCapture()
    fusion = Fusion()
    fused = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len, capture=capture, fusion=fusion)
    graphed = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len,
                     capture=Capture() if args.dry_run else CudaGraphCapture())  # fmt: skip
    eager = eager_twin(engine)
    context = [reference(engine, REF_SHORT_FRAMES)]
    out: dict[str, Any] = {}
    for target in (fused, graphed, eager):  # warm-ups: compile, capture, self-checks
        engine_run(target, context, TURNS[0], 2, opts)
    out["fused_on"], out["fused_off_reason"] = fusion.off is None, fusion.off
    out["kernels_per_sampled_frame"] = cuda_kernels_per_frame(fused) if engine.device.type == "cuda" else None
    rounds: dict[str, list[float]] = {"fused": [], "graphed": [], "eager": []}
    for i in range(opts.repeats):  # interleaved: fused, graphed, eager, fused, ...
        for name, target in (("fused", fused), ("graphed", graphed), ("eager", eager)):
            rounds[name].append(engine_run(target, context, TURNS[0], opts.frames, opts, seed=i)[0].ms_per_frame)
    out["ms_per_frame"] = {name: statistics.median(v) for name, v in rounds.items()}
    out["ms_per_frame_rounds"] = rounds
    out["fused_over_graphed_pairs"] = [f / g for f, g in zip(rounds["fused"], rounds["graphed"], strict=True)]
    log("compiled: transformers' generate, eager")
    out["transformers_eager_ms_per_frame"] = baseline_ms_per_frame(engine, context, TURNS[0], opts)
    log("compiled: bench of the fused engine")
    out["bench"] = run_bench(fused, "fused", opts, lambda t: log(f"compiled bench: {t}"))
    log("compiled: transformers' generate with static caches and torch.compile")
    out["transformers_compiled_ms_per_frame"] = transformers_compiled(engine, context, opts)
    if not args.dry_run:
        log("compiled: first and second start")
        cmd = [sys.executable, str(Path(__file__).with_name("compile_start.py")), "--size", "full", "--device",
               "cuda", "--dtype", "bfloat16", "--quick"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, check=False)
        out["starts"] = done.stdout.strip().splitlines()[-3:] + done.stderr.strip().splitlines()[-2:]
    return {"compiled": out}


def cuda_kernels_per_frame(engine: Engine) -> int:
    """CUDA kernels one sampled fused step launches (profiled eagerly, not replayed)."""
    from torch.profiler import ProfilerActivity, profile

    from companion.engine.unit import new_unit

    unit = new_unit(engine.loop, False)
    unit.fuse()
    unit.warm_up()
    unit.load(torch.zeros_like(unit.hidden), engine.loop.scratch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        unit.fast()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def transformers_compiled(engine: Engine, context: list, opts: BenchOptions) -> float:
    """transformers' generate with static caches and compiled backbone and depth decoder (the model card's
    fast path), ms per frame; the model's forwards are restored afterwards."""
    model = engine.model
    saved = (model.backbone_model.forward, model.depth_decoder.forward,
             model.generation_config.cache_implementation, model.depth_decoder.generation_config.cache_implementation)  # fmt: skip
    try:
        model.generation_config.cache_implementation = "static"
        model.depth_decoder.generation_config.cache_implementation = "static"
        model.backbone_model.forward = torch.compile(model.backbone_model.forward)
        model.depth_decoder.forward = torch.compile(model.depth_decoder.forward)
        baseline_ms_per_frame(engine, context, TURNS[0], BenchOptions(4, 1, opts.temperature, opts.topk))  # compiles
        return baseline_ms_per_frame(engine, context, TURNS[0], opts)
    finally:
        (model.backbone_model.forward, model.depth_decoder.forward, model.generation_config.cache_implementation,
         model.depth_decoder.generation_config.cache_implementation) = saved  # fmt: skip


def tiny_fused_exactness(device: torch.device, work: str, frames: int) -> dict[str, Any]:
    """float32, tiny checkpoint: fused greedy codes against the eager engine's (must be equal)."""
    engine, _ = random_engine("tiny", device, torch.float32, work)
    fusion = Fusion()
    capture = CudaGraphCapture() if device.type == "cuda" else None
    fused = Engine(engine.model, engine.processor, engine.model_key, engine.max_seq_len, capture=capture, fusion=fusion)
    context = [reference(engine, REF_SHORT_FRAMES)]
    out = agreement(greedy_codes(fused, context, frames), greedy_codes(eager_twin(engine), context, frames))
    out["fused_on"], out["fused_off_reason"] = fusion.off is None, fusion.off
    return {"tiny_fused": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GPU checks: graph self-check, graph-vs-eager exactness, bench"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny model on CPU, eager replay (no GPU needed)"
    )
    parser.add_argument("--frames", type=int, default=48, help="frames compared graphed vs eager")
    parser.add_argument("--bench-frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out section 8 (compiled frames)")
    parser.add_argument("--json", help="also write the result here (rewritten after every section)")
    args = parser.parse_args(argv)
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    if args.dry_run:
        device, dtype, size = torch.device("cpu"), torch.float32, "tiny"
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run on a GPU machine, or use --dry-run"}))
        return 2
    else:
        device, dtype, size = torch.device("cuda"), torch.bfloat16, "full"
    out: dict[str, Any] = {
        "dry_run": args.dry_run, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }  # fmt: skip
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    start = time.perf_counter()

    def save() -> None:
        out["seconds"] = time.perf_counter() - start
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(finite(out), indent=2, default=str) + "\n")

    def section(name: str, work: Callable[[], dict[str, Any]]) -> None:
        log(name)
        try:
            out.update(work())
        except Exception as err:  # recorded; the next sections still run
            out.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
            log(f"{name} FAILED: {type(err).__name__}: {err}")
        save()

    work_dir = tempfile.TemporaryDirectory()

    # 1. Tiny checkpoint, float32, real graphs (its own capture, so a failure here leaves the full run's on).
    def tiny() -> dict[str, Any]:
        engine, _ = random_engine("tiny", device, torch.float32, work_dir.name)
        capture = Capture() if args.dry_run else CudaGraphCapture()
        return {"tiny": graphed_check(engine, capture, args.frames)}

    section("tiny: float32 graphs vs eager", tiny)

    state: dict[str, Any] = {}

    # 1b. Full size in float32 with real graphs (its own capture): graph logic at full size, no bf16 rounding.
    def full_fp32() -> dict[str, Any]:
        engine, _ = random_engine(size, device, torch.float32, work_dir.name)
        capture = Capture() if args.dry_run else CudaGraphCapture()
        try:
            return {"float32": graphed_check(engine, capture, args.frames)}
        finally:
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()

    section(f"{size} model in float32: graphs vs eager vs transformers", full_fp32)

    def build() -> dict[str, Any]:
        engine, label = random_engine(size, device, dtype, work_dir.name)
        state["engine"] = engine
        return {"model": label}

    section(f"building the {size} model on {device}", build)
    capture = Capture() if args.dry_run else CUDA_GRAPHS
    opts = BenchOptions(
        frames=4 if args.dry_run else args.bench_frames, repeats=1 if args.dry_run else args.repeats
    )
    if "engine" in state:
        engine = state["engine"]
        # 2 + 3. Self-check and exactness (the engine's graphs go through ``capture``).
        section(
            f"self-check and {args.frames} greedy frames graphed vs eager",
            lambda: graphed_check(engine, capture, args.frames),
        )
        # 4b. Teacher forcing: the eager and the graph step against a float32 copy, along the same frames.
        section(
            "teacher-forced logits against float32",
            lambda: {"teacher_forced": teacher_forced(engine, args.frames)},
        )
        # 5. Speed with and without graphs.
        section("ms per frame with and without graphs", lambda: {"graph_speed": graph_speed(engine, opts)})
        # 5. The bench (graphs on, unless the self-check turned them off).
        if not args.skip_bench:
            section(
                "bench",
                lambda: {
                    "bench": run_bench(engine, out.get("model", "?"), opts, lambda t: log(f"bench: {t}"))
                },
            )
            if "bench" in out:
                out["bench"]["graphs_on"] = capture.off is None
        # 7. Several streams through one frame loop.
        section("several streams at once", lambda: {"streams": streams_check(engine, capture, args, opts, log)})
        # 8. Compiled frames (last: the transformers baseline compiles the model's own forwards).
        if not args.skip_compiled:
            section("compiled frames", lambda: compiled_check(engine, args, opts, log))
    if not args.skip_compiled:
        section("tiny: float32 compiled vs eager", lambda: tiny_fused_exactness(device, work_dir.name, args.frames))
    out["graphs_off_reason"] = capture.off
    work_dir.cleanup()
    save()
    print(json.dumps(finite(out), indent=2, default=str))
    ok = (
        "errors" not in out
        and out.get("self_check", {}).get("passed")
        and out.get("exactness", {}).get("frames", 0) > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
