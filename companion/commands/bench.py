"""`companion bench`: measure generation speed against transformers' generate and the hardware floor."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from companion.commands.common import add_model_arguments, check_memory, settings_from_args, torch_threads
from companion.config import Settings
from companion.errors import CompanionError, UsageError

HELP = "measure generation speed against transformers' generate and the hardware floor"
DESCRIPTION = (
    "Measure, in one run on the same weights, dtype and prompt: transformers' generate (the baseline), "
    "companion's engine (speed, time to first audio, prefill with a cached 10 s and 2-minute reference, "
    "Mimi decode, memory) and the hardware floor (weight bytes per frame / measured bandwidth). "
    "With --conversation N, instead: a scripted N-turn conversation with a 2-minute reference that "
    "overflows the context (positions prefilled per turn, context prunes, first-audio latency), once "
    "pruning one turn at a time and once as configured (context.prune_to). "
    "With --streams 1,2,4,8, instead: how many frames per second that many listeners at once get "
    "(each count in turn, in rounds), and each listener's speed against real time."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("bench")
    g.add_argument(
        "--random-weights", choices=["tiny", "full"],
        help="use random weights instead of --model: tiny (the test checkpoint) or full (the csm-1b architecture)",
    )  # fmt: skip
    g.add_argument("--frames", type=int, default=16, metavar="N", help="frames per speed measurement (default 16)")
    g.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per latency measurement (default 3)")
    g.add_argument("--conversation", type=int, metavar="N",
                   help="measure a scripted N-turn conversation through the session instead (prefill, prunes, first audio)")
    g.add_argument("--streams", metavar="N,N,...",
                   help="measure several streams at once instead, e.g. 1,2,4,8 (frames per second of each count, "
                        "and each stream's real-time factor)")
    g.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    if args.random_weights and args.model:
        raise UsageError("--model and --random-weights exclude each other: pick one")
    if args.frames < 2 or args.repeats < 1:
        raise UsageError("--frames must be at least 2 and --repeats at least 1")
    if args.conversation is not None and args.conversation < 1:
        raise UsageError("--conversation must be at least 1 turn")
    if args.streams is not None and args.conversation is not None:
        raise UsageError("--streams and --conversation exclude each other: pick one")
    args.counts = None
    if args.streams is not None:
        from companion.engine.bench_streams import parse_counts

        try:
            args.counts = parse_counts(args.streams)
        except ValueError as err:
            raise UsageError(str(err)) from None
    settings = settings_from_args(args)
    if not args.random_weights:
        check_memory(settings, max(args.counts or [1]))
    with torch_threads(settings.engine.threads):
        results = _measure(args, settings)
    if args.conversation:
        _print_conversation(results)
    elif args.counts:
        _print_streams(results)
    else:
        _print_table(results)
    if args.json:
        try:
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            raise CompanionError(f"cannot write {args.json}: {err.strerror or err}: pick another --json path") from err
    return 0


def _measure(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Load the model (or build random weights) and run every measurement (or the conversation)."""
    from companion.engine import bench
    from companion.engine.loading import select_device, select_dtype

    device = select_device(settings.model.device)
    dtype = select_dtype(settings.model.dtype, device)
    opts = bench.BenchOptions(frames=args.frames, repeats=args.repeats)
    max_seq_len = settings.context.max_seq_len
    max_batch = max(args.counts or [1])
    with tempfile.TemporaryDirectory(prefix="companion-bench-") as work:
        _log(f"loading {args.random_weights or settings.model.id} on {device.type} ({dtype})")
        if args.random_weights:
            engine, label = bench.random_engine(args.random_weights, device, dtype, work, max_seq_len, max_batch,
                                                settings.engine.compile)
        else:
            from companion.engine import Engine

            engine = Engine.load(settings.model.id, revision=settings.model.revision, device=device.type,
                                 dtype=str(dtype).removeprefix("torch."), max_seq_len=max_seq_len,
                                 max_batch=max_batch, compile=settings.engine.compile)  # fmt: skip
            label = engine.model_key
        if args.counts:
            from companion.engine.bench_streams import streams_section

            section = streams_section(engine, args.counts, opts, _log)
            return bench.finite({
                **section, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "model": label, "machine": bench.machine(engine.device),
            })  # fmt: skip
        if args.conversation:
            from companion.session.bench import ConversationOptions, run_conversations

            conversation = run_conversations(engine, settings, ConversationOptions(turns=args.conversation), _log)
            return bench.finite({
                "conversation": conversation, "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."), "model": label, "machine": bench.machine(engine.device),
            })  # fmt: skip
        return bench.finite(bench.run_bench(engine, label, opts, _log))


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}...[/dim]")


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3f}{unit}" if abs(value) < 10 else f"{value:,.1f}{unit}"
    return f"{value:,}{unit}"


def _print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    e, b, f, q = r["engine"], r["baseline"], r["floor"], r["ratios"]
    table = Table(title=f"companion bench: {r['model']} on {r['device']} ({r['dtype']}), {r['frames']} frames")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("transformers generate", _fmt(b["ms_per_frame"], " ms/frame")),
        ("engine", _fmt(e["ms_per_frame"], " ms/frame")),
        ("  compiled frames (--compile)", r["compiled"]),
        ("floor (weights / bandwidth)", _fmt(f["ms_per_frame"], " ms/frame")),
        ("engine / generate (median of interleaved pairs)", _fmt(q["engine_over_baseline"])),
        ("  each pair", ", ".join(_fmt(v) for v in q["engine_over_baseline_pairs"])),
        ("engine / floor", _fmt(q["engine_over_floor"])),
        ("engine RTF (with Mimi decode)", _fmt(e["rtf"])),
        ("Mimi decode (streaming, as chunked)", _fmt(e["mimi_decode_ms_per_frame"], " ms/frame")),
        ("first audio, 2-min reference, cold", _fmt(e["first_audio_ms_cold"], " ms")),
        ("first audio, 2-min reference, cached", _fmt(e["first_audio_ms_cached"], " ms")),
        ("turn prefill after 10 s reference", _fmt(e["prefill_ms_ref10s"], " ms")),
        ("turn prefill after 120 s reference", _fmt(e["prefill_ms_ref120s"], " ms")),
        ("weight bytes per frame", _fmt(f["weight_bytes_per_frame"] / 1e6, " MB")),
        ("bandwidth", _fmt(f["bandwidth_gbps"], " GB/s")),
        ("peak RSS", _fmt(e["peak_rss_mb"], " MiB")),
        ("CUDA max allocated", _fmt(e["cuda_max_allocated_mb"], " MiB")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _print_streams(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"companion bench --streams: {r['model']} on {r['device']} ({r['dtype']}), {r['frames']} frames each")
    for name in ("streams", "frames/s, all streams", "x one stream (median of rounds)", "ms/frame, each stream",
                 "real-time factor, each"):
        table.add_column(name, justify="right")
    for row in r["streams"]:
        over = row.get("aggregate_over_one")
        table.add_row(str(row["streams"]), _fmt(row["aggregate_frames_per_s"]), _fmt(over) if over is not None else "n/a",
                      _fmt(row["ms_per_frame_per_stream"]), _fmt(row["rtf_per_stream"]))
    Console().print(table)


def _print_conversation(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from companion.session.bench import PREFILL_GOAL, goal_met

    c = r["conversation"]
    b = c["baseline"]
    table = Table(title=(
        f"companion bench --conversation: {r['model']} on {r['device']} ({r['dtype']}), {c['turns']} turns, "
        f"{c['reference_seconds']:.0f} s reference, max_seq_len {c['max_seq_len']}"
    ))
    table.add_column("measure")
    table.add_column("one turn at a time", justify="right")
    table.add_column(f"prune to {c['prune_to']:g}", justify="right")
    rows = [
        ("prunes (turns dropped)", f"{b['prunes']} ({b['turns_dropped']})", f"{c['prunes']} ({c['turns_dropped']})"),
        ("prefill positions per turn, mean", _fmt(b["prefill_positions_mean"]), _fmt(c["prefill_positions_mean"])),
        ("  as a share of max_seq_len", f"{b['prefill_mean_over_max_seq_len']:.1%}", f"{c['prefill_mean_over_max_seq_len']:.1%}"),
        ("prefill positions per turn, max", _fmt(b["prefill_positions_max"]), _fmt(c["prefill_positions_max"])),
        ("first audio p50", _fmt(b["first_audio_ms_p50"], " ms"), _fmt(c["first_audio_ms_p50"], " ms")),
        ("first audio p95", _fmt(b["first_audio_ms_p95"], " ms"), _fmt(c["first_audio_ms_p95"], " ms")),
        ("reference in every prompt", _yes(b["reference_in_every_prompt"]), _yes(c["reference_in_every_prompt"])),
    ]
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    met = "met" if goal_met(c) else "NOT met"
    console.print(f"goal (pruned, mean prefill <= {PREFILL_GOAL:.0%} of max_seq_len): {met}", highlight=False)


def _yes(value: bool) -> str:
    return "yes" if value else "NO"
