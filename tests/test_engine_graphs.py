"""The logic around CUDA-graph capture (``FrameGraphs``), driven on CPU through the ``Capture`` seam.

The engine is handed a capture strategy that replays the frame step eagerly (as the base ``Capture``
does) and counts, fails or corrupts; everything else (units per kind of sampling, the scratch-position
warm-up, the self-check, the fallback and its memory) is the code that runs on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.cuda_graphs import Capture
from companion.engine.sampling import Sampler
from companion.engine.self_check import SELF_CHECK_FRAMES
from companion.engine.unit import GraphedFrame

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=8)
TEXT = "Replay me, please."


class Recorder(Capture):
    """Replays eagerly (after the warm-up a real capture does), counting captures and checking that
    the warm-up left the cached prefix's keys and values alone."""

    def __init__(self) -> None:
        super().__init__()
        self.captures = 0
        self.prefix_intact: list[bool] = []

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        self.captures += 1
        loop = unit.loop
        before = [k[:, :, : loop.length].clone() for k in loop.backbone.keys]
        replay = super().record(unit)
        after = [k[:, :, : loop.length] for k in loop.backbone.keys]
        self.prefix_intact.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))
        return replay


class FailingCapture(Recorder):
    """Warms up (writing the scratch position, as CUDA does), then fails to record."""

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        super().record(unit)
        raise RuntimeError("operation not permitted when stream is capturing")


class CorruptingCapture(Recorder):
    """A graph with a bug: its replay gets codebook 1 wrong (or, ``raising``, fails); with
    ``only_sampled``, only the sampled unit's graph has the bug."""

    def __init__(self, raising: bool = False, only_sampled: bool = False) -> None:
        super().__init__()
        self.raising, self.only_sampled = raising, only_sampled

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)
        codes = unit.loop.decodable_codes or unit.loop.vocab
        if self.only_sampled and unit.sampler.greedy:
            return step

        def replay() -> None:
            if self.raising:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            step()
            unit.codes[:, 1] = (unit.codes[:, 1] + 1) % codes

        return replay


class StaleNoiseCapture(Recorder):
    """A graph that baked in the noise it saw when recorded instead of reading the noise buffer: right
    for greedy frames (no noise), wrong for every sampled one."""

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)
        stale = unit.sampler.noise.clone()

        def replay() -> None:
            fresh, unit.sampler.noise = unit.sampler.noise, stale
            try:
                step()
            finally:
                unit.sampler.noise = fresh

        return replay


class LateFailingCapture(Recorder):
    """A graph whose replays work through the self-check, then fail from replay ``fail_at`` on (think:
    the GPU reset under it)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.replays = fail_at, 0

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)

        def replay() -> None:
            self.replays += 1
            if self.replays >= self.fail_at:
                raise RuntimeError("CUDA error: unspecified launch failure")
            step()

        return replay


class FrozenCapture(Recorder):
    """As a real CUDA graph does, the replay reads and writes the very tensors that existed when it was
    recorded: a tensor the code later replaces (instead of filling it in place) is not what it sees."""

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)
        names = [(unit, n) for n in ("hidden", "pos", "codes")]
        names += [(unit.sampler, n) for n in ("temperature", "topk", "noise", "_ranks")]
        recorded = [(owner, name, getattr(owner, name)) for owner, name in names]

        def replay() -> None:
            now = [(owner, name, getattr(owner, name)) for owner, name, _ in recorded]
            for owner, name, tensor in recorded:
                setattr(owner, name, tensor)
            try:
                step()
            finally:
                for owner, name, tensor in now:
                    setattr(owner, name, tensor)

        return replay


def engine_with(tiny_engine: Engine, capture: Capture | None) -> Engine:
    return Engine(tiny_engine.model, tiny_engine.processor, "graphs", max_seq_len=256, capture=capture)


def codes_of(engine: Engine, context: list[Segment], options: GenerationOptions = GREEDY) -> torch.Tensor:
    return torch.cat([c.codes for c in engine.stream(context, 0, TEXT, options)], dim=1)


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.5)))]


def test_greedy_codes_through_the_recorded_graph_equal_eager(tiny_engine: Engine, reference) -> None:
    recorder = Recorder()
    graphed, eager = engine_with(tiny_engine, recorder), engine_with(tiny_engine, None)
    assert eager.graphs is None  # no capture on a CPU by default
    first = codes_of(graphed, reference)
    assert torch.equal(first, codes_of(eager, reference))
    assert recorder.captures == 1 and recorder.off is None and recorder.prefix_intact == [True]
    # Warm-up and self-check wrote nothing the cache claims: it holds the prompt and the fed frames.
    prompt = graphed.last_stats.prompt_positions
    assert graphed.loop.length == prompt + GREEDY.max_frames
    assert torch.equal(graphed.loop.rows[:prompt], graphed.prompt.prompt_rows(reference, 0, TEXT))
    # The same turn again: one position prefilled, no new capture, the same codes.
    assert torch.equal(codes_of(graphed, reference), first)
    assert graphed.last_stats.prefill_positions == 1 and recorder.captures == 1


def test_a_failed_capture_gives_eager_codes_and_is_not_retried(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailingCapture()
    engine = engine_with(tiny_engine, failing)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference)
        # The cache was not reset: it holds the prompt and the frames fed back (eagerly, not the last one).
        assert engine.loop.length == engine.last_stats.prompt_positions + GREEDY.max_frames - 1
        again = codes_of(engine, reference)
        sampled = codes_of(engine, reference, GenerationOptions(temperature=0.8, topk=20, seed=3, max_frames=4))
    expected = codes_of(engine_with(tiny_engine, None), reference)
    assert torch.equal(codes, expected) and torch.equal(again, expected)
    assert sampled.shape == (engine.num_codebooks, 4)
    assert failing.captures == 1  # remembered: neither the next turn nor another sampling kind retries
    assert failing.off is not None and "capturing a frame failed" in failing.off
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]  # one line, once


@pytest.mark.parametrize("raising", [False, True], ids=["differs", "fails"])
def test_a_graph_that_disagrees_with_eager_is_turned_off(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, raising: bool
) -> None:
    corrupt = CorruptingCapture(raising)
    engine = engine_with(tiny_engine, corrupt)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference)
        codes_of(engine, reference)
    assert torch.equal(codes, codes_of(engine_with(tiny_engine, None), reference))
    assert corrupt.off is not None and "self-check" in corrupt.off
    assert corrupt.captures == 1
    assert len(caplog.records) == 1 and "self-check" in caplog.records[0].getMessage()


def test_temperature_and_topk_changes_neither_capture_nor_prefill(tiny_engine: Engine, reference) -> None:
    recorder = FrozenCapture()  # temperature and top-k must be changed in the tensors the graph reads
    engine = engine_with(tiny_engine, recorder)

    def turn(temperature: float, topk: int) -> torch.Tensor:
        return codes_of(engine, reference, GenerationOptions(temperature=temperature, topk=topk, seed=5, max_frames=6))

    warm = turn(0.9, 50)
    assert recorder.captures == 1
    prefilled = []
    results = {}
    for temperature, topk in [(0.9, 50), (0.3, 50), (0.9, 7), (0.9, 50)]:
        results[(temperature, topk)] = turn(temperature, topk)
        prefilled.append(engine.last_stats.prefill_positions)
    assert recorder.captures == 1  # one unit serves every temperature and top-k
    # Every turn reuses the whole cached prompt but its last position (no warm-up disturbed it).
    assert prefilled == [1, 1, 1, 1]
    # The values in the device tensors are the ones used: the same settings and seed, the same codes;
    # other settings give what a fresh engine gives with them, graphed or not.
    assert torch.equal(results[(0.9, 50)], warm)
    for settings in [(0.3, 50), (0.9, 7)]:
        assert not torch.equal(results[settings], warm)
        for capture in (FrozenCapture(), None):
            fresh = engine_with(tiny_engine, capture)
            expected = codes_of(fresh, reference, GenerationOptions(*settings, seed=5, max_frames=6))
            assert torch.equal(results[settings], expected)
    # Greedy is the second (and last) kind of unit.
    codes_of(engine, reference)
    turn(0.6, 30)
    assert recorder.captures == 2 and set(engine.graphs.units) == {(1, True, None), (1, False, None)}


def test_masked_width_sampling_follows_the_top_k_softmax() -> None:
    """The graph's sampler ranks every code and masks ranks >= top-k (a tensor): same distribution."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log()[None]
    sampler = Sampler(1.0, 5, 11, torch.device("cpu"), num_codebooks=1, width=5, vocab=5)
    sampler.configure(1.0, 3, 11)  # top-3 set in place
    counts = torch.zeros(5)
    for _ in range(6000):
        sampler.begin_frame()
        counts[sampler(logits)] += 1
    assert counts[3] == 0 and counts[4] == 0
    expected = probs[:3] / probs[:3].sum()
    assert torch.allclose(counts[:3] / counts.sum(), expected, atol=0.02)


SAMPLED = GenerationOptions(temperature=0.9, topk=50, seed=7, max_frames=48)


def test_a_seed_gives_the_same_sampled_codes_with_graphs_on_and_off(tiny_engine: Engine, reference) -> None:
    """Both paths draw the same noise: 48 seeded sampled frames (float32) are the same codes."""
    graphed = codes_of(engine_with(tiny_engine, Recorder()), reference, SAMPLED)
    eager = codes_of(engine_with(tiny_engine, None), reference, SAMPLED)
    assert graphed.shape == (tiny_engine.num_codebooks, 48)
    assert torch.equal(graphed, eager)
    # Another seed is other codes (the seed is used, not ignored).
    other = codes_of(engine_with(tiny_engine, None), reference, GenerationOptions(0.9, 50, 8, 48))
    assert not torch.equal(other, eager)


@pytest.mark.parametrize("bug", ["codebook 1", "stale noise"])
def test_the_sampled_unit_is_self_checked_too(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, bug: str
) -> None:
    """Only the sampled unit's graph is wrong: the greedy turn keeps graphs on, the first sampled turn's
    self-check (sampling, with the same noise in both runs) turns them off, and the sampled codes are
    the eager ones."""
    corrupt = CorruptingCapture(only_sampled=True) if bug == "codebook 1" else StaleNoiseCapture()
    engine = engine_with(tiny_engine, corrupt)
    options = GenerationOptions(temperature=0.9, topk=50, seed=3, max_frames=8)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        greedy = codes_of(engine, reference)
        assert corrupt.off is None  # the greedy unit is right
        sampled = codes_of(engine, reference, options)
    assert torch.equal(greedy, codes_of(engine_with(tiny_engine, None), reference))
    assert torch.equal(sampled, codes_of(engine_with(tiny_engine, None), reference, options))
    assert corrupt.off is not None and "self-check" in corrupt.off
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


@pytest.mark.parametrize("at", [3, 6], ids=["third frame", "sixth frame"])  # 2 or 5 frames made before it
@pytest.mark.parametrize("options", [GREEDY, GenerationOptions(0.9, 50, 11, 8)], ids=["greedy", "sampled"])
def test_a_replay_that_fails_after_the_self_check_turns_graphs_off_and_the_turn_goes_on(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, options: GenerationOptions, at: int
) -> None:
    late = LateFailingCapture(fail_at=SELF_CHECK_FRAMES + at)  # the turn's frame ``at``
    engine = engine_with(tiny_engine, late)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference, options)
        replays = late.replays
        again = codes_of(engine, reference, options)
    expected = codes_of(engine_with(tiny_engine, None), reference, options)
    assert torch.equal(codes, expected) and torch.equal(again, expected)
    assert late.off is not None and "replaying a frame failed" in late.off
    assert late.replays == replays  # remembered: the next turn replays nothing
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


@pytest.mark.parametrize("options", [GREEDY, GenerationOptions(temperature=0.8, topk=40, seed=5, max_frames=40)],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_a_cancel_stops_a_replayed_turn_between_frames_and_the_next_turn_is_exact(tiny_engine, reference,
                                                                                 options) -> None:  # fmt: skip
    """Cancel after the first chunk (2 frames): the replays stop there, graphs stay on, nothing more is
    recorded, and the next turn is the same as on an engine without graphs."""
    import threading

    capture = Recorder()
    engine, eager = engine_with(tiny_engine, capture), engine_with(tiny_engine, None)
    cancel = threading.Event()
    made = 0
    for chunk in engine.stream(reference, 0, TEXT, options, cancel):
        made += chunk.codes.shape[1]
        cancel.set()
    assert made == 2 and capture.off is None
    assert engine.loop.length == engine.last_stats.prompt_positions + 2  # the two frames, no more
    assert torch.equal(codes_of(engine, reference, options), codes_of(eager, reference, options))


@pytest.mark.parametrize("options", [GenerationOptions(temperature=0.9, topk=2, seed=3, max_frames=12),
                                     GenerationOptions(temperature=0.0, topk=50, max_frames=12)],
                         ids=["top-2 sampled", "temperature 0 with a top-k"])  # fmt: skip
def test_the_edges_of_greedy_pick_the_unit_that_gives_the_eager_codes(tiny_engine, reference, options) -> None:
    """Top-2 is sampling (the sampled unit), temperature 0 is greedy whatever the top-k (the greedy unit)."""
    capture = Recorder()
    engine, eager = engine_with(tiny_engine, capture), engine_with(tiny_engine, None)
    assert torch.equal(codes_of(engine, reference, options), codes_of(eager, reference, options))
    assert engine.graphs is not None and set(engine.graphs.checked) == {(1, options.temperature == 0.0, None)}


class SlightlyOffCapture(Recorder):
    """A graph whose hidden state is 1e-6 off (relative): close for a compiled frame, wrong for a graph
    of the step itself, which must be the step bit for bit."""

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)

        def replay() -> None:
            step()
            unit.hidden.mul_(1 + 1e-6)

        return replay


class WrongFirstCapture(Recorder):
    """A graph whose first replay picks the next code up in codebook 1, and every later replay is right:
    the self-check must hold every frame it ran, not only its last."""

    def __init__(self) -> None:
        super().__init__()
        self.replays = 0

    def record(self, unit: GraphedFrame) -> Callable[[], None]:
        step = super().record(unit)
        codes = unit.loop.decodable_codes or unit.loop.vocab

        def replay() -> None:
            self.replays += 1
            step()
            if self.replays == 1:
                unit.codes[:, 1] = (unit.codes[:, 1] + 1) % codes

        return replay


@pytest.mark.parametrize("capture", [SlightlyOffCapture, WrongFirstCapture], ids=["slightly-off", "wrong-first"])
def test_a_graph_of_the_step_must_be_the_step_bit_for_bit_in_every_checked_frame(tiny_engine: Engine, reference,
                                                                                capture) -> None:  # fmt: skip
    recorder = capture()
    engine = engine_with(tiny_engine, recorder)
    codes = codes_of(engine, reference)
    assert recorder.off is not None and "self-check" in recorder.off
    assert torch.equal(codes, codes_of(engine_with(tiny_engine, None), reference))
