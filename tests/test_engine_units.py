"""Which replayable unit a turn gets, and what is said when one fails (``cuda_graphs.py``), on the CPU.

Units are recorded through the ``Capture`` seam (tests/test_engine_graphs.py's stand-ins: eager replays
that count, fail or corrupt); the engine, its units, their self-checks and the fallbacks are the code a
GPU runs. These tests hold the edges of that logic: whether graphs are wanted at all, the kind of unit
each sampling gets, turns of no frame and of one, a cancel after a failed replay, a unit made again when
compiling goes off, a codec narrower than the vocabulary, and each failure's line, word for word.
"""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
from test_engine_fused import Perturbing, as_written
from test_engine_graphs import (
    CorruptingCapture,
    FailingCapture,
    LateFailingCapture,
    Recorder,
    codes_of,
    engine_with,
)

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.cuda_graphs import CUDA_GRAPHS, Capture, default_capture, graphs_wanted
from companion.engine.fused import Fusion
from companion.engine.sampling import BatchSampler, Sampler
from companion.engine.self_check import SELF_CHECK_FRAMES
from companion.engine.unit import GraphedFrame, new_unit

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=8)
SAMPLED = GenerationOptions(temperature=0.9, topk=50, seed=11, max_frames=8)
TEXT = "Replay me, please."
LOGGER = "companion.engine.cuda_graphs"


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.5)))]


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ---- whether graphs are wanted -----------------------------------------------------------------


def test_graphs_are_wanted_on_cuda_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects: no GPU needed
    monkeypatch.delenv("COMPANION_CUDA_GRAPHS", raising=False)
    assert graphs_wanted(cuda) and not graphs_wanted(cpu)
    assert default_capture(cuda) is CUDA_GRAPHS and default_capture(cpu) is None
    monkeypatch.setenv("COMPANION_CUDA_GRAPHS", "0")
    assert not graphs_wanted(cuda) and default_capture(cuda) is None
    monkeypatch.setenv("COMPANION_CUDA_GRAPHS", "1")
    assert graphs_wanted(cuda)


# ---- the kind of unit --------------------------------------------------------------------------


def narrow_codec(tiny_engine: Engine) -> Engine:
    """csm-1b's heads have 2051 codes and Mimi decodes 2048; here the codec decodes the first 1000."""
    model = copy.deepcopy(tiny_engine.model)
    model.codec_model.config.codebook_size = 1000
    return Engine(model, tiny_engine.processor, "narrow-codec", max_seq_len=256, capture=Recorder())


def test_a_unit_samples_one_stream_or_several_and_only_codes_the_codec_decodes(tiny_engine: Engine) -> None:
    loop = narrow_codec(tiny_engine).loop
    assert loop.decodable_codes == 1000
    for greedy in (True, False):
        one = new_unit(loop, greedy)
        assert type(one.sampler) is Sampler and one.batch == 1 and one.sampler.codes == 1000
        assert one.sampler.width == (1 if greedy else 1000)
        for rows, batched in ((2, False), (1, True), (3, True)):  # several streams, or the loop of several
            unit = new_unit(loop, greedy, rows, batched)
            assert isinstance(unit.sampler, BatchSampler) and unit.batch == rows and unit.sampler.codes == 1000
            assert unit.sampler.width == (1 if greedy else 1000) and unit.hidden.shape[0] == rows
    assert new_unit(loop, False, width=40).sampler.width == 40


def test_replayed_turns_and_their_eager_continuation_keep_to_the_codes_the_codec_decodes(tiny_engine: Engine) -> None:
    narrow = narrow_codec(tiny_engine)
    wide = Engine(tiny_engine.model, tiny_engine.processor, "wide-codec", max_seq_len=256, capture=Recorder())
    everything = GenerationOptions(temperature=0.9, topk=2048, max_frames=8, seed=3)
    for options in (GREEDY, everything):
        assert codes_of(narrow, [], options).max() < 1000
        assert codes_of(wide, [], options).max() >= 1000  # without the limit, the same weights pick such codes
    # A replay that fails after the self-check: the turn goes on eagerly, within the codec's codes too.
    model = narrow.model
    late = Engine(model, tiny_engine.processor, "narrow-late", max_seq_len=256,
                  capture=LateFailingCapture(fail_at=SELF_CHECK_FRAMES + 2))  # fmt: skip
    codes = codes_of(late, [], everything)
    assert late.graphs is not None and late.graphs.capture.off is not None
    assert codes.shape[1] == everything.max_frames and codes.max() < 1000


def test_top_k_1_is_greedy_and_takes_the_greedy_unit(tiny_engine: Engine, reference) -> None:
    engine, eager = engine_with(tiny_engine, Recorder()), engine_with(tiny_engine, None)
    options = GenerationOptions(temperature=0.9, topk=1, seed=4, max_frames=6)
    assert torch.equal(codes_of(engine, reference, options), codes_of(eager, reference, options))
    assert engine.graphs is not None and set(engine.graphs.units) == {(1, True, None)}


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_turn_of_no_frame_makes_its_unit_and_checks_nothing_one_of_one_frame_is_checked(
    tiny_engine: Engine, reference, options: GenerationOptions
) -> None:
    engine = engine_with(tiny_engine, Recorder())
    greedy = options.temperature == 0.0
    none = GenerationOptions(options.temperature, options.topk, options.seed, 0)
    assert list(engine.stream(reference, 0, TEXT, none)) == []
    assert engine.graphs is not None and set(engine.graphs.units) == {(1, greedy, None)}
    assert engine.graphs.checked == set()
    one = GenerationOptions(options.temperature, options.topk, options.seed, 1)
    assert torch.equal(codes_of(engine, reference, one), codes_of(engine_with(tiny_engine, None), reference, one))
    assert engine.graphs.checked == {(1, greedy, None)}  # a one-frame turn replays a checked unit only


# ---- after a failure ---------------------------------------------------------------------------


def test_a_cancel_reaches_the_eager_frames_after_a_failed_replay(tiny_engine: Engine, reference) -> None:
    """The replay fails at the turn's second frame; the turn goes on eagerly, and a cancel after the
    first chunk (2 frames) stops the eager frames there: not one more is made (none fed into the cache),
    and the next turn is the one an engine without graphs gives."""
    engine = engine_with(tiny_engine, LateFailingCapture(fail_at=SELF_CHECK_FRAMES + 2))
    cancel = threading.Event()
    made = 0
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=40)
    for chunk in engine.stream(reference, 0, TEXT, options, cancel):
        made += chunk.codes.shape[1]
        cancel.set()
    assert made == 2 and engine.graphs is not None and engine.graphs.capture.off is not None
    assert engine.loop.length == engine.last_stats.prompt_positions + 2
    assert torch.equal(codes_of(engine, reference), codes_of(engine_with(tiny_engine, None), reference))


class UnfusedCorrupting(CorruptingCapture):
    """Records a compiled unit as it is; a unit made without compiling gets codebook 1 wrong."""

    def record(self, unit: GraphedFrame):  # noqa: ANN201
        return Capture.record(self, unit) if unit.fused else super().record(unit)


def test_a_unit_made_again_when_compiling_goes_off_is_self_checked_again(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    fusion = Fusion(as_written)
    capture = UnfusedCorrupting()
    engine = Engine(tiny_engine.model, tiny_engine.processor, "refused", max_seq_len=256, capture=capture,
                    fusion=fusion)  # fmt: skip
    eager = engine_with(tiny_engine, None)
    assert torch.equal(codes_of(engine, reference), codes_of(eager, reference))
    assert engine.graphs is not None and engine.graphs.checked == {(1, True, None)}
    assert [u.fused for u in engine.graphs.units.values()] == [True]
    fusion.off = "another unit failed its self-check"  # compiling went off meanwhile
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(codes_of(engine, reference), codes_of(eager, reference))
    # the unit made again without compiling was checked (and failed): graphs are off, the codes eager
    assert capture.off is not None and "self-check" in capture.off
    assert lines(caplog) == [
        "CUDA graphs turned off for this run: the replay of a frame differed from the step-by-step path in a "
        f"self-check: {capture.off.split('self-check: ', 1)[1]}; generating without them (slower)"]


def test_a_unit_that_fails_to_compile_is_made_again_without_compiling(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    fusion = Fusion(Perturbing(raising=True))
    engine = Engine(tiny_engine.model, tiny_engine.processor, "uncompiled", max_seq_len=256, capture=Recorder(),
                    fusion=fusion)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(codes_of(engine, reference), codes_of(engine_with(tiny_engine, None), reference))
    assert engine.graphs is not None and set(engine.graphs.units) == {(1, True, None)}
    assert [u.fused for u in engine.graphs.units.values()] == [False]
    assert lines(caplog) == [
        "compiled frames turned off for this run: compiling a frame failed (RuntimeError: InductorError: "
        "CppCompileError: C++ compile error); generating without them (slower)"]


# ---- each failure's line ------------------------------------------------------------------------


def test_a_failed_capture_is_said_in_one_line(tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        codes_of(engine_with(tiny_engine, FailingCapture()), reference)
    assert lines(caplog) == [
        "CUDA graphs turned off for this run: capturing a frame failed (RuntimeError: operation not permitted "
        "when stream is capturing); generating without them (slower)"]


def test_a_replay_that_fails_in_its_self_check_is_said_in_one_line(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        codes_of(engine_with(tiny_engine, CorruptingCapture(raising=True)), reference)
    assert lines(caplog) == [
        "CUDA graphs turned off for this run: replaying a frame failed in a self-check (RuntimeError: CUDA error: "
        "an illegal memory access was encountered); generating without them (slower)"]


class LateFailingWith(LateFailingCapture):
    def __init__(self, fail_at: int, error: Exception) -> None:
        super().__init__(fail_at)
        self.error = error

    def record(self, unit: GraphedFrame):  # noqa: ANN201
        replay = super().record(unit)

        def failing() -> None:
            try:
                replay()
            except RuntimeError:
                raise self.error from None

        return failing


@pytest.mark.parametrize(("error", "said"), [
    (RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be reported later"),
     "RuntimeError: CUDA error: unspecified launch failure"),
    (OSError(), "OSError: "),
], ids=["first line only", "no message"])  # fmt: skip
def test_a_replay_that_fails_in_a_turn_is_said_by_its_first_line(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, error: Exception, said: str
) -> None:
    engine = engine_with(tiny_engine, LateFailingWith(SELF_CHECK_FRAMES + 3, error))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(codes_of(engine, reference), codes_of(engine_with(tiny_engine, None), reference))
    assert lines(caplog) == [f"CUDA graphs turned off for this run: replaying a frame failed ({said}); "
                             "generating without them (slower)"]  # fmt: skip
