"""Replayed frames for several streams (one unit of ``max_batch`` rows per kind of sampling), driven on
CPU through the ``Capture`` seam.

Streams with nothing in common run one after another so that each lands in a known slot (a stream that
shares no prefix with any slot's record takes an empty slot rather than overwrite another's record):
every frame runs at four rows, the slots nobody uses being padding. The engine with a capture must give
exactly the codes of the same engine without one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from test_engine_graphs import CorruptingCapture, FrozenCapture, LateFailingCapture, Recorder

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.cuda_graphs import Capture
from companion.engine.unit import GraphedFrame

GREEDY = GenerationOptions(temperature=0.0, max_frames=8)
SAMPLED = GenerationOptions(temperature=0.8, topk=40, seed=3, max_frames=8)
TEXTS = ["Slot zero speaks first.", "Then slot one, beside padding.", "Slot two, at four rows.", "And slot three."]


def engine_with(base: Engine, capture: Capture | None) -> Engine:
    return Engine(base.model, base.processor, "batch-graphs", max_seq_len=256, capture=capture, max_batch=4)


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.0)))]


def one_by_one(engine: Engine, context: list[Segment], options: GenerationOptions) -> list[torch.Tensor]:
    """Each text alone, in turn, each after its own voice's reference: the i-th lands in slot i (every
    earlier slot holds another's record)."""
    out = []
    for i, text in enumerate(TEXTS):
        voice = [Segment(i, context[0].text, context[0].codes[:, i:])]  # another speaker, other audio
        out.append(torch.cat([c.codes for c in engine.stream(voice, i, text, options)], dim=1))
        assert engine.loop.lengths[i] > 0
    return out


class SizeRecorder(Recorder):
    """Counts captures per batch size and checks that no slot's cached prefix moved during a capture."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        self.sizes.append(unit.batch)
        loop = unit.loop
        before = [[k[s, :, : loop.lengths[s]].clone() for k in loop.backbone.keys] for s in range(loop.slots)]
        replay = super().record(unit)
        after = [[k[s, :, : loop.lengths[s]] for k in loop.backbone.keys] for s in range(loop.slots)]
        self.prefix_intact.append(all(torch.equal(a, b) for x, y in zip(before, after, strict=True)
                                      for a, b in zip(x, y, strict=True)))  # fmt: skip
        return replay


class FrozenSizes(FrozenCapture, SizeRecorder):
    """Replays keep the tensors they recorded (as CUDA graphs do), counted per size."""


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_one_unit_of_four_rows_with_padding_gives_the_codes_without_graphs(tiny_engine, reference, options) -> None:
    capture = FrozenSizes()
    graphed, eager = engine_with(tiny_engine, capture), engine_with(tiny_engine, None)
    got, expected = one_by_one(graphed, reference, options), one_by_one(eager, reference, options)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert capture.sizes == [4]  # one unit, captured at its first use, reused by every slot after
    assert all(capture.prefix_intact) and capture.off is None
    assert graphed.graphs is not None and set(graphed.graphs.checked) == {(4, options.temperature == 0, None)}


class CorruptSampled(CorruptingCapture):
    """Only the sampling unit has the bug; the greedy one is right."""

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        if getattr(unit.sampler, "greedy", False):
            return Recorder.record(self, unit)
        return super().record(unit)


@pytest.mark.parametrize("raising", [False, True], ids=["differs", "raises"])
def test_each_unit_is_self_checked_and_a_bad_one_turns_graphs_off(tiny_engine, reference, raising,
                                                                 caplog) -> None:  # fmt: skip
    capture = CorruptSampled(raising=raising)
    graphed, eager = engine_with(tiny_engine, capture), engine_with(tiny_engine, None)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        assert all(torch.equal(g, e) for g, e in zip(one_by_one(graphed, reference, GREEDY),
                                                     one_by_one(eager, reference, GREEDY), strict=True))  # fmt: skip
        assert capture.off is None  # the greedy unit passed its check
        got = one_by_one(graphed, reference, SAMPLED)
    assert all(torch.equal(g, e) for g, e in zip(got, one_by_one(eager, reference, SAMPLED), strict=True))
    assert capture.off is not None and "4 streams" in capture.off
    assert graphed.graphs is not None and set(graphed.graphs.checked) == {(4, True, None)}
    assert len([r for r in caplog.records if "turned off" in r.getMessage()]) == 1


def test_a_replay_that_fails_mid_turn_goes_on_eagerly_with_the_same_noise(tiny_engine, reference, caplog) -> None:
    # Replays: 3 in the unit's self-check, slot 0's 8 frames; then slot 1's replays fail from its 4th frame.
    capture = LateFailingCapture(fail_at=3 + 8 + 4)
    graphed, eager = engine_with(tiny_engine, capture), engine_with(tiny_engine, None)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        got = one_by_one(graphed, reference, SAMPLED)
    assert all(torch.equal(g, e) for g, e in zip(got, one_by_one(eager, reference, SAMPLED), strict=True))
    assert capture.off is not None and capture.off.startswith("replaying a frame failed")
    assert [r.getMessage() for r in caplog.records if "turned off" in r.getMessage()] == [
        "CUDA graphs turned off for this run: replaying a frame failed (RuntimeError: CUDA error: unspecified launch "
        "failure); generating without them (slower)"]


def test_streams_together_through_graphs_finish_exactly_their_frames(tiny_engine, reference) -> None:
    """Four at once (whatever frame each joins at): every stream gets all its frames, graphs stay on,
    and afterwards each slot's record is its prompt and the frames it was given."""
    import threading

    capture = FrozenSizes()
    engine = engine_with(tiny_engine, capture)
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        opts = GenerationOptions(temperature=0.0, max_frames=6 + 2 * i)
        results[i] = torch.cat([c.codes for c in engine.stream(reference, 0, TEXTS[i], opts)], dim=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == [0, 1, 2, 3] and capture.off is None
    assert [results[i].shape[1] for i in range(4)] == [6, 8, 10, 12]
    loop = engine.loop
    for slot in range(4):
        rows = loop.rows_of(slot)
        i = next(i for i in range(4) if torch.equal(rows[-results[i].shape[1]:, 1:].T, results[i]))
        prompt = engine.prompt.prompt_rows(reference, 0, TEXTS[i])
        assert torch.equal(rows[: len(prompt)], prompt.to(rows.device))
        assert len(rows) == len(prompt) + results[i].shape[1]  # a replay feeds every frame, the last too
