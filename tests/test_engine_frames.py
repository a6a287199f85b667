"""The frame loop itself (companion/engine/frames.py), on the tiny checkpoint: several slots fed in one
step, what the record of each slot's cache says, codes the codec cannot decode, a bf16 prompt."""

from __future__ import annotations

import copy

import torch

from companion.engine import Engine, GenerationOptions
from companion.engine.frames import FrameLoop
from companion.engine.prompt import NO_TOKEN
from companion.engine.sampling import RowSamplers, Sampler
from companion.engine.self_check import TOLERANCE

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=8)


def greedy(loop: FrameLoop) -> Sampler:
    return Sampler(0.0, 1, 0, loop.device, loop.num_codebooks, loop.decodable_codes, vocab=loop.vocab)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (a two-row matrix product may round unlike a one-row one)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_slots_fed_in_one_step_get_what_each_gets_alone(tiny_engine: Engine) -> None:
    model, prompt = tiny_engine.model, tiny_engine.prompt
    # Two prompts of different lengths and speakers: the slots sit at different positions.
    prompts = [prompt.prompt_rows([], 0, "One two."), prompt.prompt_rows([], 1, "A longer line of text, said slowly.")]
    assert len(prompts[0]) != len(prompts[1])
    together = FrameLoop(model, 96, slots=2)
    alone = [FrameLoop(model, 96, slots=1) for _ in prompts]
    hidden = [together.prefill(rows, slot=s)[0] for s, rows in enumerate(prompts)]
    single = [loop.prefill(rows)[0] for loop, rows in zip(alone, prompts, strict=True)]
    assert together.lengths == [len(p) for p in prompts]
    for s, h in enumerate(single):
        assert torch.equal(together.rows_of(s), alone[s].rows)
        assert close(hidden[s], h)

    for fed in ([True, True], [False, True], [True, False]):
        state = torch.cat(hidden)  # (2, 1, H)
        samplers = RowSamplers([greedy(together), greedy(together)])
        samplers.begin_frame()
        codes = together.depth_frame(state, samplers)  # (2, K): one frame per slot in one call
        for s, loop in enumerate(alone):
            assert torch.equal(codes[s], loop.depth_frame(hidden[s], greedy(loop))[0])
        lengths = list(together.lengths)
        out = together.feed_rows(codes, fed)
        for s, loop in enumerate(alone):
            if fed[s]:
                assert close(out[s : s + 1], loop.feed(codes[s]))
                hidden[s] = out[s : s + 1]
                assert together.lengths[s] == lengths[s] + 1
                assert torch.equal(together.rows_of(s)[-1], torch.cat([torch.tensor([NO_TOKEN]), codes[s]]))
            else:  # a slot not fed keeps its position and its record
                assert together.lengths[s] == lengths[s]
            assert torch.equal(together.rows_of(s), loop.rows)


def test_a_frame_fed_back_is_recorded_as_audio_over_whatever_the_position_held(tiny_engine: Engine) -> None:
    loop = FrameLoop(tiny_engine.model, 96, slots=1)
    long = tiny_engine.prompt.prompt_rows([], 0, "A line long enough to leave text behind it.")
    short = tiny_engine.prompt.prompt_rows([], 0, "Short.")
    loop.prefill(long)
    hidden, _ = loop.prefill(short)  # the positions after it still hold the long line's text
    assert (long[len(short) :, 0] != NO_TOKEN).all()
    frame = loop.depth_frame(hidden, greedy(loop))[0]
    loop.feed(frame)
    assert torch.equal(loop.rows, torch.cat([short, torch.cat([torch.tensor([NO_TOKEN]), frame])[None]]))


def test_after_a_reset_every_slot_prefills_its_whole_prompt_again(tiny_engine: Engine) -> None:
    loop = FrameLoop(tiny_engine.model, 96, slots=2)
    rows = tiny_engine.prompt.prompt_rows([], 0, "Again and again.")
    for slot in (0, 1):
        assert loop.prefill(rows, slot=slot)[1] == len(rows)
        assert loop.prefill(rows, slot=slot)[1] == 1  # all but the last position reused
    loop.reset()
    assert loop.lengths == [0, 0]
    for slot in (0, 1):
        assert loop.prefill(rows, slot=slot)[1] == len(rows)


def test_a_prefix_is_reused_from_its_own_slot_only(tiny_engine: Engine) -> None:
    loop = FrameLoop(tiny_engine.model, 96, slots=2)
    rows = tiny_engine.prompt.prompt_rows([], 0, "Mine, not yours.")
    loop.prefill(rows, slot=1)
    assert loop.reusable_prefix(rows, 1) == len(rows) - 1
    assert loop.reusable_prefix(rows, 0) == 0
    assert loop.prefill(rows, slot=0)[1] == len(rows)


def test_codes_the_codec_cannot_decode_are_never_generated(tiny_engine: Engine) -> None:
    # csm-1b's heads have 2051 codes and Mimi decodes 2048; here the codec decodes the first 1000.
    model = copy.deepcopy(tiny_engine.model)
    model.codec_model.config.codebook_size = 1000
    narrow = Engine(model, tiny_engine.processor, "narrow-codec", max_seq_len=256)
    assert narrow.loop.decodable_codes == 1000
    wide = Engine(tiny_engine.model, tiny_engine.processor, "wide-codec", max_seq_len=256)
    for options in (GREEDY, GenerationOptions(temperature=0.9, topk=2048, max_frames=8, seed=3)):
        codes = torch.cat([c.codes for c in narrow.stream([], 0, "Say something.", options)], dim=1)
        assert codes.max() < 1000
        unlimited = torch.cat([c.codes for c in wide.stream([], 0, "Say something.", options)], dim=1)
        assert unlimited.max() >= 1000  # without the limit, the same weights pick such codes


def test_a_bf16_prompt_reaches_the_float32_state_within_bf16s_tolerance(tiny_engine: Engine) -> None:
    rows = tiny_engine.prompt.prompt_rows([], 0, "Half the bits.")
    full = FrameLoop(tiny_engine.model, 64, slots=1).prefill(rows)[0]
    half = FrameLoop(copy.deepcopy(tiny_engine.model).to(torch.bfloat16), 64, slots=1).prefill(rows)[0]
    assert half.dtype == torch.bfloat16
    gap = torch.linalg.vector_norm(half.float() - full) / torch.linalg.vector_norm(full)
    assert gap <= TOLERANCE[torch.bfloat16].relative
