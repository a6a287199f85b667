"""Acceptance 3: a turn on the cached prefix gives the same greedy codes as a full prefill."""

from __future__ import annotations

import torch

from companion.engine import Engine, GenerationOptions, Segment

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=8)


def codes_of(engine: Engine, context: list[Segment], speaker: int, text: str) -> torch.Tensor:
    return torch.cat([c.codes for c in engine.stream(context, speaker, text, GREEDY)], dim=1)


def fresh(engine: Engine) -> Engine:
    """Another engine on the same weights with an empty cache (a full prefill every first time)."""
    return Engine(engine.model, engine.processor, engine.model_key, max_seq_len=engine.max_seq_len)


def test_reference_prefix_is_reused_and_gives_the_same_codes(tiny_engine: Engine, speech_24k) -> None:
    engine = fresh(tiny_engine)
    reference = [Segment(0, "This is how I sound.", engine.encode(speech_24k("narrator.mp3", 2.0)))]
    ref_positions = engine.segment_positions(reference[0])
    codes_of(engine, reference, 0, "A first turn.")
    assert engine.last_stats.prefill_positions == engine.last_stats.prompt_positions
    # A second turn shares the reference: only its own text is prefilled.
    cached = codes_of(engine, reference, 0, "And a second one.")
    stats = engine.last_stats
    # (The two texts may share their first tokens, e.g. "<bos>[0]A", which are reused too.)
    assert 0 < stats.prefill_positions <= stats.prompt_positions - ref_positions
    full = codes_of(fresh(tiny_engine), reference, 0, "And a second one.")
    assert torch.equal(cached, full)


def test_appending_a_finished_turn_does_not_prefill_it_again(tiny_engine: Engine, speech_24k) -> None:
    engine = fresh(tiny_engine)
    reference = [Segment(1, "Hello, it's me.", engine.encode(speech_24k("guest.mp3", 1.5)))]
    reply = codes_of(engine, reference, 1, "How are you?")
    assert reply.shape[1] == GREEDY.max_frames  # the random model never ends: the cap stopped it
    # The session appends the finished turn. New positions: its last frame (a frame at the cap is not
    # fed back), its end frame and the new text.
    context = [*reference, Segment(1, "How are you?", reply)]
    cached = codes_of(engine, context, 1, "Fine, thanks.")
    assert engine.last_stats.prefill_positions == 2 + engine.text_positions(1, "Fine, thanks.")
    full = codes_of(fresh(tiny_engine), context, 1, "Fine, thanks.")
    assert torch.equal(cached, full)


def test_a_changed_prefix_is_prefilled_from_the_first_difference(tiny_engine: Engine, speech_24k) -> None:
    engine = fresh(tiny_engine)
    audio = engine.encode(speech_24k("guest.mp3", 1.0))
    codes_of(engine, [Segment(0, "One.", audio)], 0, "Next.")
    other = [Segment(0, "Two.", audio)]  # same length, different text token early on
    cached = codes_of(engine, other, 0, "Next.")
    assert engine.last_stats.prefill_positions > engine.segment_positions(other[0]) - 3
    assert torch.equal(cached, codes_of(fresh(tiny_engine), other, 0, "Next."))


def test_the_same_prompt_twice_gives_the_same_codes(tiny_engine: Engine) -> None:
    engine = fresh(tiny_engine)
    first = codes_of(engine, [], 0, "Again and again.")
    second = codes_of(engine, [], 0, "Again and again.")
    assert engine.last_stats.prefill_positions == 1  # everything but the last position is reused
    assert torch.equal(first, second)
