"""``companion bench``: the engine against transformers' ``generate`` and the hardware floor, in one run.

Everything is measured on the same weights, dtype and device. The prompt is a reference segment of
random Mimi codes (10 s = 125 frames, or 120 s = 1500 frames) with a made-up transcript of about the
token length real speech of that duration has, followed by a short turn to speak.

What the numbers mean:
- ``baseline.ms_per_frame``: ``CsmForConditionalGeneration.generate`` (sampling, temperature 0.9,
  top-k 50), time between consecutive frames (prefill excluded), 10 s reference prompt;
- ``engine.ms_per_frame``: the engine's frame generation (backbone + depth decoder, no Mimi decode),
  same prompt and sampling;
- ``engine.rtf``: (generation + streaming Mimi decode) time per frame / 80 ms of audio per frame;
- ``engine.first_audio_ms_cold``: from ``stream()`` to the first audio chunk with the 2-minute
  reference not yet cached (its whole prefill included); ``..._cached``: the same with it cached;
- ``engine.prefill_ms_ref10s`` / ``_ref120s``: prefill of a turn after the cached reference prefix;
- ``floor``: see ``companion.engine.floor``;
- ``ratios.engine_over_baseline``: the median of ``repeats`` pairs, each an engine run and the baseline
  run right after it (A B A B ...), so load that comes and goes on a busy machine hits both sides of a
  pair alike; ``ratios.engine_over_baseline_pairs`` keeps every pair's ratio.
Every other timing is the best of ``repeats`` runs (other load on a shared machine only ever adds time);
``*_runs`` keep all of them.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from companion.engine.engine import Engine, fusion_for
from companion.engine.floor import measure_bandwidth, weight_bytes_per_frame
from companion.engine.mimi_stream import MimiStreamDecoder
from companion.engine.prompt import NO_TOKEN
from companion.engine.types import EngineStats, GenerationOptions, Segment

FRAME_MS = 80.0  # audio per frame: 1920 samples at 24 kHz
REF_SHORT_FRAMES = 125  # 10 s
REF_LONG_FRAMES = 1500  # 120 s
TOKENS_PER_SECOND = 3.5  # transcript tokens per second of speech (about 2.7 words/s at 1.3 tokens/word)
TURNS = [
    "Hello there, how are you today?",
    "It is a quarter past ten, and the weather is warm.",
    "We met at the station and walked home together.",
    "Thank you very much, that was quick!",
]
SLOW_COLD_MS = 20_000.0  # a cold 2-minute prefill slower than this is measured once, not --repeats times
WORDS = "we met at the station talked for an hour and then walked home together the weather is warm".split()


@dataclass
class BenchOptions:
    frames: int = 16  # frames generated per speed measurement
    repeats: int = 3  # runs per measurement (the best is reported)
    temperature: float = 0.9
    topk: int = 50


# ---- the prompt -----------------------------------------------------------------------------------


def made_up_text(engine: Engine, speaker: int, tokens: int) -> str:
    """A transcript of about ``tokens`` text positions (words cycled until it is long enough)."""
    words: list[str] = []
    while engine.text_positions(speaker, " ".join(words)) < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
    return " ".join(words)


def reference(engine: Engine, frames: int, speaker: int = 0, seed: int = 0) -> Segment:
    """A reference segment of ``frames`` random non-zero codes and a transcript of matching length."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(engine.model.codec_model.config.codebook_size)
    codes = torch.randint(1, vocab, (engine.num_codebooks, frames), generator=gen)
    text = made_up_text(engine, speaker, round(frames / engine.frame_rate * TOKENS_PER_SECOND))
    return Segment(speaker=speaker, text=text, codes=codes)


# ---- one engine run -------------------------------------------------------------------------------


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def engine_run(
    engine: Engine, context: list[Segment], text: str, frames: int, opts: BenchOptions, seed: int = 0
) -> tuple[EngineStats, torch.Tensor]:
    """Speak ``text`` after ``context`` (speaker 0); return the stats and the `(K, n)` codes."""
    options = GenerationOptions(temperature=opts.temperature, topk=opts.topk, seed=seed, max_frames=frames)
    chunks = [chunk.codes for chunk in engine.stream(context, 0, text, options)]
    _sync(engine)
    codes = torch.cat(chunks, dim=1) if chunks else torch.zeros(engine.num_codebooks, 0, dtype=torch.long)
    return engine.last_stats, codes


def _best(values: list[float]) -> float:
    """The best of repeated timings: on a shared machine, other load only ever adds time."""
    return float(min(values))


def prefill_after_prefix(engine: Engine, ref: Segment, opts: BenchOptions) -> tuple[float, int]:
    """Best turn prefill (ms) after ``ref`` is cached, and the positions that were prefilled."""
    engine_run(engine, [ref], TURNS[0], 2, opts)  # caches the reference prefix
    times, positions = [], 0
    for i in range(opts.repeats):
        stats, _ = engine_run(engine, [ref], TURNS[1 + i % (len(TURNS) - 1)], 2, opts)
        times.append(stats.prefill_ms)
        positions = stats.prefill_positions
    return _best(times), positions


def first_audio(engine: Engine, long_ref: Segment, opts: BenchOptions) -> dict[str, float]:
    """First-audio latency with the 2-minute reference, cold (a different voice was cached) and cached."""
    assert long_ref.codes is not None
    cold: list[float] = []
    cold_prefill: list[float] = []
    cached: list[float] = []
    for i in range(opts.repeats):
        # A reference of another speaker occupies the cache, so the long reference starts cold.
        if not cold or cold[-1] < SLOW_COLD_MS:
            engine_run(engine, [Segment(1, "Another voice.", long_ref.codes[:, :8])], TURNS[0], 2, opts)
            stats, _ = engine_run(engine, [long_ref], TURNS[i % len(TURNS)], 2, opts)
            cold.append(stats.first_audio_ms or 0.0)
            cold_prefill.append(stats.prefill_ms)
        stats, _ = engine_run(engine, [long_ref], TURNS[(i + 1) % len(TURNS)], 2, opts)
        cached.append(stats.first_audio_ms or 0.0)
    return {
        "first_audio_ms_cold": _best(cold),
        "prefill_ms_cold_ref120s": _best(cold_prefill),
        "first_audio_ms_cached": _best(cached),
    }


# ---- Mimi -----------------------------------------------------------------------------------------


@torch.inference_mode()
def mimi_timings(engine: Engine, codes: torch.Tensor) -> dict[str, float]:
    """ms per frame: streaming decode one frame at a time, and transformers' whole-segment decode."""
    mimi = engine.model.codec_model
    decoder = MimiStreamDecoder(mimi)
    n = codes.shape[1]
    decoder.decode(codes[:, :1])  # warm-up
    decoder.reset()
    start = time.perf_counter()
    for i in range(n):
        decoder.decode(codes[:, i : i + 1])
    _sync(engine)
    stream_ms = (time.perf_counter() - start) * 1000 / n
    start = time.perf_counter()
    mimi.decode(codes[None].to(engine.device))
    _sync(engine)
    whole_ms = (time.perf_counter() - start) * 1000 / n
    return {"stream_1frame_ms_per_frame": stream_ms, "whole_decode_ms_per_frame": whole_ms}


# ---- the baseline ---------------------------------------------------------------------------------


class _FrameClock:
    """A ``generate`` streamer that notes the time of every frame (`(1, K)` puts)."""

    def __init__(self, num_codebooks: int, sync: Callable[[], None]) -> None:
        self.k, self.sync = num_codebooks, sync
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2 and value.shape[-1] == self.k:
            self.sync()
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def prompt_embeds(engine: Engine, rows: torch.Tensor) -> torch.Tensor:
    """`(P, K + 1)` prompt rows -> `(1, P, H)` input embeddings from the model's own embedding modules."""
    model = engine.model
    rows = rows.to(engine.device)
    is_text = rows[:, 0] != NO_TOKEN
    text = model.embed_text_tokens(rows[:, 0].clamp(min=0))  # (P, H)
    audio = model.backbone_model.embed_tokens(rows[None, :, 1:].clamp(min=0))[0]  # (P, H): summed codebooks
    return torch.where(is_text[:, None], text, audio)[None]


@torch.inference_mode()
def baseline_ms_per_frame(
    engine: Engine, context: list[Segment], text: str, opts: BenchOptions, warm_up: bool = True
) -> float:
    """transformers' ``generate`` on the same prompt: ms between consecutive frames."""
    embeds = prompt_embeds(engine, engine.prompt.prompt_rows(context, 0, text))
    sample = {"do_sample": True, "temperature": opts.temperature, "top_k": opts.topk}
    depth = {f"depth_decoder_{k}": v for k, v in sample.items()}

    def generate(frames: int) -> list[float]:
        clock = _FrameClock(engine.num_codebooks, lambda: _sync(engine))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=engine.device)
        torch.manual_seed(0)
        engine.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=frames, streamer=clock, **sample, **depth
        )
        return clock.times

    if warm_up:
        generate(2)
    times = generate(opts.frames)
    if len(times) < 2:
        return float("nan")
    return (times[-1] - times[0]) * 1000 / (len(times) - 1)


# ---- machine and memory ---------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / (1024 * 1024)


def machine(device: torch.device) -> dict[str, Any]:
    """A short description of where the bench ran."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- random weights -------------------------------------------------------------------------------

_ROPE = {  # csm-1b: llama3 RoPE scaling
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
    "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
}  # fmt: skip


def random_engine(
    kind: str, device: torch.device, dtype: torch.dtype, workdir: str, max_seq_len: int = 4096, max_batch: int = 1,
    compile: str = "off",
) -> tuple[Engine, str]:
    """An engine on random weights: ``tiny`` (the test checkpoint, written to ``workdir`` and loaded as a
    user's model is) or ``full`` (the csm-1b architecture, built directly in ``dtype`` on ``device``);
    ``compile``: ``engine.compile``."""
    from transformers import (
        CsmConfig,
        CsmDepthDecoderConfig,
        CsmForConditionalGeneration,
        CsmProcessor,
        EncodecFeatureExtractor,
        MimiConfig,
    )

    from companion.testing import tiny_checkpoint as tc

    if kind == "tiny":
        path = tc.write_tiny_checkpoint(workdir, codebooks=32, seed=0)
        dtype_name = str(dtype).removeprefix("torch.")
        engine = Engine.load(str(path), device=device.type, dtype=dtype_name, max_seq_len=max_seq_len,
                             max_batch=max_batch, compile=compile)
        return engine, "random-tiny"
    # The csm-1b architecture (transformers' defaults for CsmConfig are csm-1b's sizes), with the test
    # tokenizer: its special-token ids go into the config; the text vocabulary keeps its real size.
    tokenizer = tc.build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = CsmConfig(
        rope_parameters=dict(_ROPE), bos_token_id=ids(tc.BOS), pad_token_id=ids(tc.AUDIO),
        audio_token_id=ids(tc.AUDIO), audio_eos_token_id=ids(tc.AUDIO_EOS),
        depth_decoder_config=CsmDepthDecoderConfig(rope_parameters=dict(_ROPE)).to_dict(),
        codec_config=MimiConfig().to_dict(),
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CsmForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0)
    processor = CsmProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=tc.CHAT_TEMPLATE)
    engine = Engine(model, processor, "random-full@seed0", max_seq_len, max_batch=max_batch,
                    fusion=fusion_for(compile, device))
    return engine, "random-full (csm-1b architecture)"


# ---- the whole bench ------------------------------------------------------------------------------


def warm_up(engine: Engine, opts: BenchOptions) -> None:
    """Two short turns: the first starts compiling its frame beside generation (when frames are
    compiled), which is waited for, so that the second records and checks the compiled frame."""
    engine_run(engine, [], TURNS[0], 2, opts)
    engine.wait_compiled()
    engine_run(engine, [], TURNS[0], 2, opts)


def speed_pairs(
    engine: Engine, short_ref: Segment, opts: BenchOptions, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any], list[float], torch.Tensor]:
    """Speed on the 10 s reference prompt, the engine and the baseline interleaved (A B A B ...).

    Returns the engine's numbers, the baseline's, each pair's engine / baseline ratio, and the codes of
    the engine's best run."""
    log("speed: the engine and transformers' generate, interleaved")
    warm_up(engine, opts)
    baseline_ms_per_frame(engine, [short_ref], TURNS[0], BenchOptions(2, 1, opts.temperature, opts.topk), warm_up=False)
    runs, baseline_runs, pairs = [], [], []
    for i in range(opts.repeats):
        runs.append(engine_run(engine, [short_ref], TURNS[0], opts.frames, opts, seed=i))
        baseline_runs.append(baseline_ms_per_frame(engine, [short_ref], TURNS[0], opts, warm_up=False))
        pairs.append(runs[-1][0].ms_per_frame / baseline_runs[-1])
        log(f"speed: pair {i + 1} of {opts.repeats}: engine / generate {pairs[-1]:.3f}")
    stats, codes = min(runs, key=lambda run: run[0].ms_per_frame)
    decode_ms = min(s.decode_ms / max(s.frames, 1) for s, _ in runs)
    eng: dict[str, Any] = {
        "ms_per_frame": stats.ms_per_frame,
        "frames": stats.frames,
        "rtf": (stats.ms_per_frame + decode_ms) / FRAME_MS,
        "mimi_decode_ms_per_frame": decode_ms,
        "ms_per_frame_runs": [s.ms_per_frame for s, _ in runs],
    }
    baseline = {"ms_per_frame": min(baseline_runs), "ms_per_frame_runs": baseline_runs}
    return eng, baseline, pairs, codes


def engine_section(
    engine: Engine, short_ref: Segment, long_ref: Segment, opts: BenchOptions, log: Callable[[str], None]
) -> dict[str, Any]:
    """The engine's prefill, first-audio and memory numbers."""
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    warm_up(engine, opts)
    eng: dict[str, Any] = {}
    # Step 1: turn prefill after a cached 10 s and 120 s reference; first audio with the 120 s one.
    log("engine: prefill after a cached 10 s reference")
    eng["prefill_ms_ref10s"], eng["prefill_positions_ref10s"] = prefill_after_prefix(engine, short_ref, opts)
    log("engine: first audio with a 2-minute reference (cold, then cached)")
    eng.update(first_audio(engine, long_ref, opts))
    log("engine: prefill after a cached 120 s reference")
    eng["prefill_ms_ref120s"], eng["prefill_positions_ref120s"] = prefill_after_prefix(engine, long_ref, opts)
    # Step 2: memory so far (the baseline has not run yet).
    cuda = engine.device.type == "cuda"
    eng["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20 if cuda else None
    eng["peak_rss_mb"] = peak_rss_mb()
    return eng


def floor_section(engine: Engine, bandwidths: list[float]) -> dict[str, Any]:
    """Weight bytes per frame, the best of the bandwidths measured during the run, and their ratio."""
    parts = weight_bytes_per_frame(engine.model)
    bandwidth = max(bandwidths)
    return {
        "weight_bytes_per_frame": parts["total"],
        "weight_bytes_by_part": {k: v for k, v in parts.items() if k != "total"},
        "bandwidth_gbps": bandwidth,
        "bandwidth_gbps_samples": bandwidths,
        "ms_per_frame": parts["total"] / (bandwidth * 1e9) * 1000,
    }


def run_bench(engine: Engine, model_label: str, opts: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """All measurements, as the nested dict ``companion bench --json`` writes."""
    short_ref, long_ref = reference(engine, REF_SHORT_FRAMES), reference(engine, REF_LONG_FRAMES, seed=1)
    # The bandwidth is sampled at the start, middle and end: other load only ever lowers it.
    log("floor: weight-streaming bandwidth")
    bandwidths = [measure_bandwidth(engine.device, engine.dtype)]
    eng = engine_section(engine, short_ref, long_ref, opts, log)
    bandwidths.append(measure_bandwidth(engine.device, engine.dtype))
    speed, baseline, pairs, codes = speed_pairs(engine, short_ref, opts, log)
    eng.update(speed)
    out: dict[str, Any] = {"engine": eng, "baseline": baseline}
    if codes.shape[1]:
        out["mimi"] = mimi_timings(engine, codes)
    bandwidths.append(measure_bandwidth(engine.device, engine.dtype))
    out["floor"] = floor_section(engine, bandwidths)
    out["ratios"] = {
        "engine_over_baseline": statistics.median(pairs),
        "engine_over_baseline_pairs": pairs,
        "engine_over_floor": eng["ms_per_frame"] / out["floor"]["ms_per_frame"],
        "prefill_ref120s_over_ref10s": eng["prefill_ms_ref120s"] / max(eng["prefill_ms_ref10s"], 1e-9),
    }
    out.update(
        device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."), model=model_label,
        frames=opts.frames, machine=machine(engine.device), compiled=compiled_state(engine),
    )  # fmt: skip
    return out


def compiled_state(engine: Engine) -> str:
    """Whether the engine's frames were compiled: "on", "off", or "turned off: why"."""
    if engine.fusion is None:
        return "off"
    return "on" if engine.fusion.off is None else f"turned off: {engine.fusion.off}"


def finite(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
