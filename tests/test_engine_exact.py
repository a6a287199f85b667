"""Acceptance 1: with top-k 1 the engine's codes equal transformers' generate, frame for frame.

The reference inputs go through CsmProcessor and its chat template with the raw audio (the real
path: generate encodes the context audio itself); the engine gets the codes from ``Engine.encode``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from companion.engine import Engine, GenerationOptions, Segment

GREEDY = GenerationOptions(temperature=0.0, topk=1, seed=0, max_frames=12)
TWO_SPEAKERS = [
    (1, "I found the keys under the sofa.", "guest.mp3", 1.6),
    (0, "Good, then we can leave at ten.", "narrator.mp3", 2.0),
]


def reference_codes(
    engine: Engine, turns: list[tuple[int, str, np.ndarray | None]], frames: int
) -> torch.Tensor:
    """`(n, K)` frames from ``generate(do_sample=False, depth_decoder_do_sample=False)``, end frame dropped."""
    conversation = []
    for speaker, text, audio in turns:
        content: list[dict] = [{"type": "text", "text": text}]
        if audio is not None:
            content.append({"type": "audio", "path": audio})
        conversation.append({"role": str(speaker), "content": content})
    inputs = engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    with torch.no_grad():
        out = engine.model.generate(
            **inputs, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=frames
        )[0]
    ends = (out == 0).all(dim=1).nonzero()
    return out[: int(ends[0, 0])] if len(ends) else out


def engine_codes(engine: Engine, context: list[Segment], speaker: int, text: str) -> torch.Tensor:
    chunks = list(engine.stream(context, speaker, text, GREEDY))
    return torch.cat([c.codes for c in chunks], dim=1).T if chunks else torch.zeros(0, engine.num_codebooks)


def two_speaker_prompt(
    engine: Engine, speech_24k: Callable[[str, float], np.ndarray]
) -> tuple[list[tuple[int, str, np.ndarray | None]], list[Segment]]:
    turns: list[tuple[int, str, np.ndarray | None]] = []
    context = []
    for speaker, text, clip, seconds in TWO_SPEAKERS:
        audio = speech_24k(clip, seconds)
        turns.append((speaker, text, audio))
        context.append(Segment(speaker, text, engine.encode(audio)))
    return turns, context


def test_no_context(tiny_engine: Engine) -> None:
    ref = reference_codes(tiny_engine, [(0, "Hello from Sesame.", None)], GREEDY.max_frames)
    mine = engine_codes(tiny_engine, [], 0, "Hello from Sesame.")
    assert mine.shape == (GREEDY.max_frames, 32)
    assert torch.equal(mine, ref)


def test_context_audio_from_two_speakers(tiny_engine: Engine, speech_24k) -> None:
    turns, context = two_speaker_prompt(tiny_engine, speech_24k)
    ref = reference_codes(tiny_engine, [*turns, (1, "Then let's go.", None)], GREEDY.max_frames)
    tiny_engine.loop.reset()  # a cold cache: this test checks a full prefill
    mine = engine_codes(tiny_engine, context, 1, "Then let's go.")
    assert tiny_engine.last_stats.prefill_positions == tiny_engine.last_stats.prompt_positions
    assert torch.equal(mine, ref)


def test_prompt_within_20_positions_of_the_budget(tiny_engine: Engine, speech_24k) -> None:
    turns, context = two_speaker_prompt(tiny_engine, speech_24k)
    text = "Fine."
    prompt = sum(tiny_engine.segment_positions(s) for s in context) + tiny_engine.text_positions(1, text)
    budget = prompt + GREEDY.max_frames + 7  # 7 positions to spare
    tight = Engine(tiny_engine.model, tiny_engine.processor, tiny_engine.model_key, max_seq_len=budget)
    ref = reference_codes(tiny_engine, [*turns, (1, text, None)], GREEDY.max_frames)
    mine = engine_codes(tight, context, 1, text)
    assert tight.last_stats.prompt_positions == prompt
    assert torch.equal(mine, ref)


@pytest.mark.parametrize("text", ["Hello from Sesame.", "It's 10:45, isn't it? (Yes.)"])
def test_positions_match_the_processor(tiny_engine: Engine, speech_24k, text: str) -> None:
    audio = speech_24k("guest.mp3", 1.0)
    conversation = [
        {"role": "0", "content": [{"type": "text", "text": "Hi."}, {"type": "audio", "path": audio}]},
        {"role": "1", "content": [{"type": "text", "text": text}]},
    ]
    ids = tiny_engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    context = [Segment(0, "Hi.", tiny_engine.encode(audio))]
    mine = tiny_engine.segment_positions(context[0]) + tiny_engine.text_positions(1, text)
    assert mine == ids.shape[1]
