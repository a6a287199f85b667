"""Streaming, stopping, sampling and the context budget of ``Engine.stream``."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CsmForConditionalGeneration

from companion.engine import ContextTooLong, Engine, GenerationOptions, Segment
from companion.errors import CompanionError


def fresh(engine: Engine, max_seq_len: int | None = None) -> Engine:
    return Engine(
        engine.model, engine.processor, engine.model_key, max_seq_len=max_seq_len or engine.max_seq_len
    )


def test_chunks_grow_and_decode_like_the_whole_segment(tiny_engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=30)
    chunks = list(tiny_engine.stream([], 0, "Streaming, please.", options))
    assert [c.codes.shape[1] for c in chunks] == [2, 4, 8, 10, 6]
    for c in chunks:
        assert c.audio.dtype == np.float32 and c.audio.shape == (c.codes.shape[1] * 1920,)
        assert c.codes.dtype == torch.long and c.codes.device.type == "cpu"
    streamed = np.concatenate([c.audio for c in chunks])
    whole = tiny_engine.decode(torch.cat([c.codes for c in chunks], dim=1))
    assert np.abs(streamed - whole).max() <= 1e-4 * max(np.abs(whole).max(), 1e-6)
    stats = tiny_engine.last_stats
    assert stats.frames == 30 and stats.ms_per_frame > 0
    # the first chunk comes after the prefill, on the same clock (a first-audio time taken from the wrong start
    # or after the wrong chunk fails this; 'is not None' could not)
    assert stats.first_audio_ms is not None and stats.first_audio_ms > stats.prefill_ms > 0


def test_max_frames_caps_the_segment(tiny_engine: Engine) -> None:
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=3)
    chunks = list(tiny_engine.stream([], 1, "Short.", options))
    assert sum(c.codes.shape[1] for c in chunks) == 3


def test_cancel_stops_generation(tiny_engine: Engine) -> None:
    cancel = threading.Event()
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=200)
    frames = 0
    for chunk in tiny_engine.stream([], 0, "Stop me.", options, cancel=cancel):
        frames += chunk.codes.shape[1]
        cancel.set()
    assert frames == 2  # the first chunk, then nothing more
    assert tiny_engine.last_stats.frames == 2


def test_a_first_frame_that_ends_gives_an_empty_segment(tiny_model_dir: Path, tiny_engine: Engine) -> None:
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # all logits equal: greedy picks code 0 everywhere, the end frame
        model.lm_head.weight.zero_()
        model.depth_decoder.codebooks_head.weight.zero_()
    engine = Engine(model, tiny_engine.processor, "ends-at-once", max_seq_len=256)
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=10)
    assert list(engine.stream([], 0, "Nothing to say.", options)) == []
    assert engine.last_stats.frames == 0
    # transformers agrees: its first frame is the all-zero end frame.
    inputs = engine.processor("[0]Nothing to say.", add_special_tokens=True, return_tensors="pt")
    ids = torch.tensor([[engine.prompt.bos, *inputs["input_ids"][0].tolist(), engine.prompt.eos]])
    out = model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=10)
    assert out.shape[1] == 1 and not out.any()


def test_sampling_is_seeded(tiny_engine: Engine) -> None:
    def sample(seed: int) -> torch.Tensor:
        options = GenerationOptions(temperature=0.9, topk=50, seed=seed, max_frames=4)
        return torch.cat([c.codes for c in tiny_engine.stream([], 0, "Random.", options)], dim=1)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_one_is_greedy_at_any_temperature(tiny_engine: Engine) -> None:
    def run(temperature: float, topk: int) -> torch.Tensor:
        options = GenerationOptions(temperature=temperature, topk=topk, seed=5, max_frames=4)
        return torch.cat([c.codes for c in tiny_engine.stream([], 0, "Greedy.", options)], dim=1)

    assert torch.equal(run(0.9, 1), run(0.0, 50))


def test_a_prompt_that_cannot_fit_is_refused_before_generating(tiny_engine: Engine, speech_24k) -> None:
    reference = [Segment(0, "My voice.", tiny_engine.encode(speech_24k("narrator.mp3", 3.0)))]
    prompt = tiny_engine.segment_positions(reference[0]) + tiny_engine.text_positions(0, "Hi.")
    engine = fresh(tiny_engine, max_seq_len=prompt + 311)
    options = GenerationOptions(max_frames=312)
    with pytest.raises(ContextTooLong) as err:
        engine.stream(reference, 0, "Hi.", options)  # raised by the call itself, before any work
    text = str(err.value)
    assert f"needs {prompt + 312} positions ({prompt} for the prompt + 312 for the reply)" in text
    assert f"only {prompt + 311} are available" in text
    assert "shorter reference" in text and "$CLEAR$" in text and "context.max_seq_len" in text
    assert len(engine.loop.rows) == 0  # nothing was prefilled
    # Exactly the budget fits (a shorter cap keeps the test fast).
    engine = fresh(tiny_engine, max_seq_len=prompt + 12)
    assert len(list(engine.stream(reference, 0, "Hi.", GenerationOptions(max_frames=12, seed=0)))) > 0


def test_mimi_runs_in_float32_whatever_the_model_dtype(tiny_model_dir: Path, tiny_engine: Engine) -> None:
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    assert model.codec_model.dtype == torch.bfloat16
    engine = Engine(model, tiny_engine.processor, "bf16", max_seq_len=128)
    assert model.codec_model.dtype == torch.float32 and engine.dtype == torch.bfloat16
    # Upcast from bf16-rounded weights, this codec is not the checkpoint's: it never shares cached codes.
    assert engine.codec_key.startswith("mimi float32 cpu ") and engine.codec_key != tiny_engine.codec_key


def test_a_second_live_stream_is_refused_naming_the_first(tiny_engine: Engine) -> None:
    """One engine's caches belong to one stream: a second one is refused (never run on shared state),
    and the first goes on exactly as it would alone."""
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=12)
    alone = torch.cat([c.codes for c in fresh(tiny_engine).stream([], 0, "The first stream speaks.", options)], dim=1)
    engine = fresh(tiny_engine)
    first = engine.stream([], 0, "The first stream speaks.", options)
    early = engine.stream([], 1, "Made before the first started.", options)
    codes = [next(first).codes]  # the first is live from its first step
    with pytest.raises(CompanionError) as err:
        engine.stream([], 1, "The second one.", options)
    message = str(err.value)
    assert "'The first stream speaks.'" in message and "\n" not in message
    with pytest.raises(CompanionError, match="The first stream speaks"):
        next(early)  # a stream made earlier is refused at its first step
    codes += [c.codes for c in first]
    assert torch.equal(torch.cat(codes, dim=1), alone)
    # Finished, closed or dropped, a stream frees the engine.
    assert len(list(engine.stream([], 0, "Now it is free.", options))) > 0
    for end in ("close", "drop"):
        live = engine.stream([], 0, "Stopped early.", options)
        next(live)
        if end == "close":
            live.close()
        else:
            del live
            gc.collect()
        again = torch.cat([c.codes for c in engine.stream([], 0, "The first stream speaks.", options)], dim=1)
        assert torch.equal(again, alone)


def test_a_bf16_engine_and_a_float32_engine_encode_a_reference_alike(tiny_model_dir: Path, speech_24k) -> None:
    """The codec keeps the checkpoint's float32 weights whatever the model's dtype: both engines encode
    the same codes and share the reference cache's key; the rest of the model is exactly a bf16 load."""
    f32 = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", max_seq_len=64)
    bf16 = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", max_seq_len=64)
    assert bf16.dtype == torch.bfloat16 and bf16.model.codec_model.dtype == torch.float32
    clip = speech_24k("narrator.mp3", 3.0)
    assert torch.equal(f32.encode(clip), bf16.encode(clip))
    assert f32.codec_key == bf16.codec_key
    direct = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    for name, param in direct.named_parameters():
        if not name.startswith("codec_model."):
            mine = bf16.model.get_parameter(name)
            assert mine.dtype == param.dtype and torch.equal(mine, param), name


def test_a_top_k_above_the_codes_there_are_is_clamped(tiny_engine: Engine) -> None:
    """Config allows top-k up to 2051; with fewer codes it means all of them (and the same seed, the same codes)."""
    vocab = tiny_engine.loop.vocab
    assert tiny_engine.decodable_codes is None and vocab < 2051  # every code decodable, fewer than 2051

    def codes(topk: int) -> torch.Tensor:
        options = GenerationOptions(temperature=0.9, topk=topk, seed=4, max_frames=6)
        return torch.cat([c.codes for c in tiny_engine.stream([], 0, "Any code at all.", options)], dim=1)

    assert torch.equal(codes(2051), codes(vocab))
