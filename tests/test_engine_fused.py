"""Compiled frames (``fused.py``) and what guards them, on a CPU.

The pieces run through ``Fusion``'s compiler seam: ``torch.compile`` itself (inductor, on the CPU) where
the codes are compared, and plain functions (the pieces run as written, no compilation) or deliberately
wrong ones where the self-check, its tolerances and the fallback are tested.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine_graphs import Recorder

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.cuda_graphs import Capture
from companion.engine.fused import FusedStep, Fusion, compile_wanted
from companion.engine.self_check import TOLERANCE, Tolerance, agreement
from companion.engine.unit import GraphedFrame, new_unit

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=12)
SAMPLED = GenerationOptions(temperature=0.9, topk=40, seed=11, max_frames=12)
TEXT = "Compile me, please."


def as_written(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A compiler that changes nothing: the pieces run as written."""
    return fn


def engine_with(tiny_engine: Engine, fusion: Fusion | None, capture: Capture | None = None,
                max_batch: int = 1) -> Engine:  # fmt: skip
    return Engine(tiny_engine.model, tiny_engine.processor, "fused", max_seq_len=256, capture=capture,
                  fusion=fusion, max_batch=max_batch)  # fmt: skip


def codes_of(engine: Engine, context: list[Segment], options: GenerationOptions = GREEDY) -> torch.Tensor:
    return torch.cat([c.codes for c in engine.stream(context, 0, TEXT, options)], dim=1)


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.5)))]


class Perturbing:
    """A compiler whose ``feed`` piece scales the backbone's hidden state by ``1 + scale`` (a fused step a
    little, or very, wrong); with ``wrong_code``, the codebook piece also picks the next code up (in every
    frame, or only in the frames numbered in ``wrong_frames``: 0 is the warm-up, 1 the first frame checked)."""

    def __init__(self, scale: float = 0.0, wrong_code: bool = False, raising: bool = False,
                 wrong_frames: tuple[int, ...] | None = None) -> None:  # fmt: skip
        self.scale, self.wrong_code, self.raising, self.wrong_frames = scale, wrong_code, raising, wrong_frames
        self.compiled: list[str] = []
        self.frame = -1  # frames run compiled so far, less one (counted at each ``first`` piece)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__
        self.compiled.append(name)
        if self.raising:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nmore lines\nof the log")

        def piece(*args: Any) -> Any:
            out = fn(*args)
            if name == "_first":
                self.frame += 1
            if name == "_feed":  # (codes, frame, hidden, pos): the hidden state it wrote, scaled
                args[2].mul_(1 + self.scale)
            if name in ("_codebook", "_codebooks") and self.wrong_code and self.frame in (self.wrong_frames or (self.frame,)):
                code, *rest = out
                return ((code + 1) % 2048, *rest)
            return out

        return piece


# ---- with torch.compile itself ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")
def test_compiled_frames_give_the_eager_codes_for_48_greedy_frames(
    tiny_engine: Engine, reference, inductor_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32: inductor's fused kernels give the step-by-step path's codes, frame for frame."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    fusion = Fusion()
    fused = engine_with(tiny_engine, fusion)
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=48)
    codes = codes_of(fused, reference, options)
    assert fusion.off is None
    units = list(fused.graphs.units.values()) if fused.graphs else []
    assert [u.fused for u in units] == [True]
    assert codes.shape == (fused.num_codebooks, 48)
    assert torch.equal(codes, codes_of(engine_with(tiny_engine, None), reference, options))


# ---- the pieces as written (no compilation: fast) -----------------------------------------------


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_pieces_do_what_the_step_does(tiny_engine: Engine, greedy: bool, rows: int) -> None:
    """One frame from the same state and noise: the same codes and positions, hidden states within the
    float32 tolerance (the depth decoder attends through a position mask there, not a slice)."""
    engine = engine_with(tiny_engine, None, max_batch=rows)
    loop = engine.loop
    unit = new_unit(loop, greedy, rows, batched=rows > 1)
    pieces = FusedStep(unit, as_written)
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(unit.hidden.shape, generator=generator)
    positions = [3, 7, 11][:rows]
    if not greedy and rows > 1:
        for b in range(rows):
            unit.sampler.load(b, 0.7 + 0.1 * b, [5, 40, 2048][b], None)
        unit.sampler.noise.uniform_(generator=generator)
    elif not greedy:
        unit.sampler.configure(0.8, 30, 9)
    def prepare() -> None:
        unit.load(start, positions if rows > 1 else positions[0])
        if rows == 1:
            unit.sampler.configure(0.8, 30, 9) if not greedy else None
            unit.sampler.begin_frame()

    step_and_pieces_agree(unit, pieces, prepare)


def step_and_pieces_agree(unit: GraphedFrame, pieces: FusedStep, prepare: Callable[[], None]) -> None:
    """One frame by the step, then by the pieces, each after ``prepare()`` loads the same state and noise:
    the same codes and positions, hidden states within float32's tolerance."""
    outs = []
    for run in (unit.step, pieces):
        prepare()
        with torch.no_grad():
            run()
        outs.append(((torch.cat([unit.codes, unit.pos[:, None]], dim=1)), unit.hidden.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert agreement([outs[1]], [outs[0]], [], TOLERANCE[torch.float32]) is None


@pytest.mark.parametrize("codebooks", [2, 3, 5])
def test_the_pieces_do_what_the_step_does_for_any_number_of_codebooks(tmp_path: Path, codebooks: int) -> None:
    """Codebooks 1 .. K-2 go two at a time; with an odd number of them (K odd), the last goes alone;
    with none (K = 2), the frame is ``first``, ``last`` and ``feed``."""
    from companion.testing.tiny_checkpoint import write_tiny_checkpoint

    engine = Engine.load(str(write_tiny_checkpoint(tmp_path, codebooks=codebooks)), device="cpu", dtype="float32",
                         max_seq_len=64)  # fmt: skip
    calls: list[str] = []

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: calls.append(fn.__name__) or fn(*args)

    for greedy in (True, False):
        unit = new_unit(engine.loop, greedy)
        pieces = FusedStep(unit, counted)
        start = torch.randn(unit.hidden.shape, generator=torch.Generator().manual_seed(codebooks))

        def prepare(unit: GraphedFrame = unit, start: torch.Tensor = start) -> None:
            unit.load(start, 5)
            unit.sampler.configure(0.8, 30, 9)
            unit.sampler.begin_frame()

        step_and_pieces_agree(unit, pieces, prepare)
    middle = ["_codebooks"] * ((codebooks - 2) // 2) + ["_codebook"] * ((codebooks - 2) % 2)
    assert calls == 2 * (["_first", *middle, "_last", "_feed"])


def test_fused_frames_from_the_pieces_give_eager_codes_greedy_and_sampled(tiny_engine: Engine, reference) -> None:
    fusion = Fusion(as_written)
    fused, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    narrow, beyond = dataclasses.replace(SAMPLED, topk=7), dataclasses.replace(SAMPLED, topk=4096)
    for options in (GREEDY, SAMPLED, narrow, GREEDY, SAMPLED, beyond):
        assert torch.equal(codes_of(fused, reference, options), codes_of(eager, reference, options))
    assert fusion.off is None
    # On a CPU a sampled unit ranks exactly its top-k (at most every code there is): one unit for each.
    widths = {(1, True, None): 1, (1, False, 40): 40, (1, False, 7): 7, (1, False, 2048): 2048}
    assert fused.graphs is not None and fused.graphs.checked == set(widths)
    assert {k: u.sampler.width for k, u in fused.graphs.units.items()} == widths
    # The cache holds the prompt and the frames fed back, nothing the self-check wrote.
    prompt = fused.last_stats.prompt_positions
    assert torch.equal(fused.loop.rows[:prompt], fused.prompt.prompt_rows(reference, 0, TEXT))


def test_a_fused_step_within_tolerance_stays_on(tiny_engine: Engine, reference) -> None:
    """A hidden state 1e-5 off (float32's tolerance is 1e-4) passes the self-check: fusion stays on."""
    fusion = Fusion(Perturbing(scale=1e-5))
    engine = engine_with(tiny_engine, fusion)
    codes = codes_of(engine, reference)
    assert fusion.off is None and codes.shape == (engine.num_codebooks, GREEDY.max_frames)


@pytest.mark.parametrize("wrong", [{"scale": 1e-3}, {"wrong_code": True}, {"wrong_code": True, "wrong_frames": (1,)}],
                         ids=["hidden-off", "wrong-code", "wrong-code-in-the-first-frame-only"])
def test_a_fused_step_beyond_tolerance_turns_fusion_off_and_codes_are_eager(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, wrong: dict[str, Any]
) -> None:
    fusion = Fusion(Perturbing(**wrong))
    engine = engine_with(tiny_engine, fusion)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference)
        again = codes_of(engine, reference, SAMPLED)
    eager = engine_with(tiny_engine, None)
    assert torch.equal(codes, codes_of(eager, reference))
    assert torch.equal(again, codes_of(eager, reference, SAMPLED))
    assert fusion.off is not None and "self-check" in fusion.off
    assert ("below the best choice" in fusion.off) == ("wrong_code" in wrong)
    assert ("relative difference" in fusion.off) == ("scale" in wrong)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "compiled frames turned off" in messages[0] and "\n" not in messages[0]
    # On a CPU the step without fusion is not used: generation is the step-by-step loop.
    assert engine.graphs is not None and engine.graphs.units == {}


def test_a_compile_error_turns_fusion_off_in_one_line(tiny_engine: Engine, reference, caplog) -> None:
    compiler = Perturbing(raising=True)
    fusion = Fusion(compiler)
    engine = engine_with(tiny_engine, fusion)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference)
        codes_of(engine, reference, SAMPLED)
    assert torch.equal(codes, codes_of(engine_with(tiny_engine, None), reference))
    assert compiler.compiled == ["_first"]  # not tried again: the next turn and the other kind stay eager
    assert fusion.off is not None and "compiling a frame failed" in fusion.off and "more lines" not in fusion.off
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]


def test_with_graphs_a_wrong_fused_step_falls_back_to_the_graphed_step(tiny_engine: Engine, reference) -> None:
    """Where frames are recorded (CUDA graphs, here the eager Recorder), a fused unit that fails its check
    is made again without fusion: graphs stay on, and the codes are the graphed step's (bit for bit)."""
    recorder = Recorder()
    fusion = Fusion(Perturbing(wrong_code=True))
    engine = engine_with(tiny_engine, fusion, recorder)
    codes = codes_of(engine, reference)
    assert fusion.off is not None and recorder.off is None and recorder.captures == 2
    assert engine.graphs is not None and [u.fused for u in engine.graphs.units.values()] == [False]
    assert torch.equal(codes, codes_of(engine_with(tiny_engine, None), reference))


def test_fusion_off_is_remembered_by_every_engine_that_shares_it(tiny_engine: Engine, reference) -> None:
    fusion = Fusion(Perturbing(scale=1.0))
    codes_of(engine_with(tiny_engine, fusion), reference)
    assert fusion.off is not None
    other = engine_with(tiny_engine, fusion)
    codes_of(other, reference)
    assert other.graphs is not None and other.graphs.units == {}


class FailingLater:
    """A compiler whose ``feed`` piece raises from its ``fail_at``-th call on (a fused frame that worked
    through its warm-up and self-check, then fails in a turn)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.feeds = fail_at, 0

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if fn.__name__ != "_feed":
            return fn

        def feed(*args: Any) -> Any:
            self.feeds += 1
            if self.feeds >= self.fail_at:
                raise RuntimeError("compiled kernel failed\nand a long log")
            return fn(*args)

        return feed


WARM_UP_AND_CHECK = 1 + 8  # feeds before a turn's first frame: the warm-up and the 8 self-check frames


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_compiled_frame_failing_in_a_turn_turns_compiling_off_and_the_turn_goes_on(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture, options: GenerationOptions
) -> None:
    """Frame 4 of the turn fails: the turn goes on step by step from frame 3, with the codes the
    uncompiled path gives (seeded sampling too); the next turn does not compile again."""
    fusion = Fusion(FailingLater(fail_at=WARM_UP_AND_CHECK + 4))
    engine = engine_with(tiny_engine, fusion)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        codes = codes_of(engine, reference, options)
        again = codes_of(engine, reference, options)
    eager = codes_of(engine_with(tiny_engine, None), reference, options)
    assert torch.equal(codes, eager) and torch.equal(again, eager)
    assert fusion.off is not None and "replaying a frame failed" in fusion.off and "long log" not in fusion.off
    assert engine.graphs is not None and engine.graphs.capture.off is None and engine.graphs.units == {}
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "compiled frames turned off" in caplog.records[0].getMessage()


def test_with_graphs_a_compiled_frame_failing_in_a_turn_is_replaced_by_the_graphed_step(
    tiny_engine: Engine, reference
) -> None:
    recorder = Recorder()
    fusion = Fusion(FailingLater(fail_at=WARM_UP_AND_CHECK + 2))
    engine = engine_with(tiny_engine, fusion, recorder)
    codes = codes_of(engine, reference)
    again = codes_of(engine, reference)
    eager = codes_of(engine_with(tiny_engine, None), reference)
    assert torch.equal(codes, eager) and torch.equal(again, eager)
    assert fusion.off is not None and recorder.off is None and recorder.captures == 2
    assert engine.graphs is not None and [u.fused for u in engine.graphs.units.values()] == [False]


# ---- the tolerance ------------------------------------------------------------------------------


def frames_with(error: float, gap: float = 0.0, frames: int = 8) -> tuple[list, list, list]:
    """Eager frames and replayed ones whose hidden states are ``error`` off (relative), and the gaps of
    their codes (one code ``gap`` below the best choice)."""
    generator = torch.Generator().manual_seed(0)
    eager, replayed, gaps = [], [], []
    for _ in range(frames):
        codes = torch.randint(0, 2048, (1, 33), generator=generator)
        hidden = torch.randn(1, 1, 64, generator=generator)
        noise = torch.randn(1, 1, 64, generator=generator)
        eager.append((codes, hidden))
        replayed.append((codes.clone(), hidden + error * noise * hidden.norm() / noise.norm()))
        gaps.append(torch.zeros(1))
    gaps[3] = torch.tensor([gap])
    return replayed, eager, gaps


@pytest.mark.parametrize(
    ("dtype", "error", "gap", "passes"),
    [
        (torch.float32, 0.0, 0.0, True),
        (torch.float32, 0.9e-4, 0.9e-4, True),
        (torch.float32, 1.1e-4, 0.0, False),
        (torch.float32, 0.0, 1.1e-4, False),
        (torch.bfloat16, 4.9e-2, 4.9e-2, True),  # a near tie that rounding decided the other way
        (torch.bfloat16, 5.1e-2, 0.0, False),
        (torch.bfloat16, 0.0, 5.1e-2, False),
        (torch.bfloat16, 0.0, float("inf"), False),  # a code that was not a candidate at all
        (torch.float16, 0.9e-2, 0.9e-2, True),
        (torch.float16, 1.1e-2, 0.0, False),
    ],
)
def test_the_tolerance_of_each_dtype(dtype: torch.dtype, error: float, gap: float, passes: bool) -> None:
    replayed, eager, gaps = frames_with(error, gap)
    assert (agreement(replayed, eager, gaps, TOLERANCE[dtype]) is None) == passes


def test_a_nan_never_agrees() -> None:
    replayed, eager, gaps = frames_with(0.0)
    replayed[3] = (replayed[3][0], torch.full_like(replayed[3][1], float("nan")))
    assert agreement(replayed, eager, gaps, Tolerance(relative=1.0)) is not None
    replayed, eager, gaps = frames_with(0.0, gap=float("nan"))
    assert agreement(replayed, eager, gaps, Tolerance(relative=1.0)) is not None


def test_frames_at_other_positions_never_agree() -> None:
    replayed, eager, gaps = frames_with(0.0)
    replayed[2][0][0, -1] += 1  # the position column
    assert agreement(replayed, eager, gaps, Tolerance(relative=1.0)) == "the frames went to other positions"


def test_forced_picks_measure_how_far_a_code_is_from_the_best() -> None:
    """The eager step made to pick given codes. Greedy: (best - picked) / largest |logit|. Sampled: a code
    outside the top-k by how far its logit is below the k-th best; a code past the logits: infinitely
    far; padding rows are not measured."""
    from companion.engine.sampling import Sampler
    from companion.engine.self_check import ForcedPicks

    logits = torch.tensor([[4.0, 2.0, -1.0, 3.0], [1.0, 0.5, 0.0, -8.0]])
    greedy = Sampler(0.0, 1, 0, torch.device("cpu"), 2)
    forced = ForcedPicks(greedy, torch.tensor([[3, 0], [0, 9]]), torch.tensor([True, True]))
    assert torch.equal(forced(logits), torch.tensor([3, 0]))
    assert torch.allclose(forced.gaps[0], torch.tensor([(4.0 - 3.0) / 4.0, 0.0]))
    forced(logits)
    assert forced.gaps[1][1] == float("inf")  # code 9: no such code
    sampled = Sampler(1.0, 2, 5, torch.device("cpu"), 2, vocab=4)
    sampled.begin_frame()
    forced = ForcedPicks(sampled, torch.tensor([[2], [0]]), torch.tensor([True, False]))
    forced(logits)  # code 2 (logit -1) is not among row 0's two best (4 and 3): 4 below the k-th, of 4
    assert forced.gaps[0].shape == (1,) and torch.allclose(forced.gaps[0], torch.tensor([1.0]))
    masked = Sampler(1.0, 4, 5, torch.device("cpu"), 2, width=4, vocab=4)  # a graph's: every code ranked
    masked.configure(1.0, 2, 5)
    masked.begin_frame()
    forced = ForcedPicks(masked, torch.tensor([[2], [0]]), torch.tensor([True, False]))
    forced(logits * 1e-3)  # the same, a thousand times smaller: the same relative gap (not relative to 1)
    assert torch.allclose(forced.gaps[0], torch.tensor([1.0]))


def test_a_near_tie_at_the_edge_of_the_top_k_is_close() -> None:
    """Codes 1 and 3 are 0.01 apart at the edge of a top-2 ({0, 1} here). Another path whose rounding put
    code 3 there instead picks from {0, 3}: where the noise made code 1 the best here, it picks code 0
    (or 3). Within a tolerance that covers the tie both are close; with none, code 0 is not."""
    from companion.engine.sampling import Sampler
    from companion.engine.self_check import ForcedPicks

    logits = torch.tensor([[5.0, 2.0, -3.0, 1.99]])
    tried = 0
    for seed in range(200):
        sampled = Sampler(1.0, 2, seed, torch.device("cpu"), 1, vocab=4)
        sampled.begin_frame()
        if int(sampled.pick(logits, 0)[0]) != 1:
            continue
        tried += 1
        gaps = {}
        for tolerance in (0.0, 0.01):
            for code in (0, 3):
                forced = ForcedPicks(sampled, torch.tensor([[code]]), torch.tensor([True]), tolerance)
                forced(logits)
                gaps[tolerance, code] = float(forced.gaps[0])
        assert gaps[0.01, 0] == 0.0 and gaps[0.0, 0] > 0.0  # code 1 is not surely in the top-2
        assert gaps[0.01, 3] == gaps[0.0, 3] == pytest.approx(0.01 / 5, rel=1e-4)  # the edge: 0.01 below
    assert tried >= 10


# ---- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "device", "wanted"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("auto", "mps", False), ("on", "cpu", True),
     ("on", "cuda", True), ("off", "cuda", False), ("off", "cpu", False)],
)  # fmt: skip
def test_engine_compile_setting(setting: str, device: str, wanted: bool) -> None:
    assert compile_wanted(setting, torch.device(device)) is wanted


def test_an_unknown_compile_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="use auto, on or off"):
        compile_wanted("yes", torch.device("cpu"))


def test_a_unit_is_fused_only_when_asked(tiny_engine: Engine) -> None:
    loop = engine_with(tiny_engine, None).loop
    plain: GraphedFrame = new_unit(loop, True)
    assert not plain.fused and plain.fast == plain.step
    plain.fuse(as_written)
    assert plain.fused and isinstance(plain.fast, FusedStep)


def test_engine_compile_in_the_config_file(companion_home) -> None:
    from companion.config import load_settings
    from companion.errors import CompanionError

    config = companion_home / "config" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    assert load_settings().engine.compile == "auto"
    for written, meant in [("'on'", "on"), ("on", "on"), ("off", "off"), ("auto", "auto")]:  # YAML: on is true
        config.write_text(f"engine:\n  compile: {written}\n")
        assert load_settings().engine.compile == meant
    config.write_text("engine:\n  compile: sometimes\n")
    with pytest.raises(CompanionError) as refused:
        load_settings()
    assert "engine.compile" in str(refused.value) and "'auto', 'on' or 'off'" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_one_line_before_compiling_into_an_empty_cache(tmp_path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from companion.engine import fused

    cache = tmp_path / "compiled"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setattr(fused, "_told", set())
    (cache / "locks").mkdir(parents=True)  # what the vector check (started at load) keeps: no compiled code
    (cache / "q6").mkdir()
    with caplog.at_level(logging.WARNING, logger="companion.engine.fused"):
        fused.first_compile_notice()
        fused.first_compile_notice()  # once a process
        assert [r.getMessage() for r in caplog.records] == [
            "compiling the speech model's frame step for this machine (the first start only: a minute or more; "
            "later starts reuse it, and engine.compile: off skips it)"]
        monkeypatch.setattr(fused, "_told", set())
        (cache / "fxgraph").mkdir()  # what an earlier start compiled: nothing to say
        fused.first_compile_notice()
    assert len(caplog.records) == 1


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir) -> Engine:
    return Engine.load(str(tiny_model_dir), dtype="bfloat16", max_seq_len=256)


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_in_bfloat16_a_right_step_passes_and_a_wrong_one_does_not(bf16_engine: Engine, options) -> None:
    """bf16 (what a GPU runs): the pieces as written round otherwise than the step (a position mask in
    the depth decoder's attention, not a slice), and codes part at near ties; the self-check lets that
    through, and still catches a step that picks the next code up."""
    context = [Segment(0, "This is how I sound.", torch.randint(1, 2048, (bf16_engine.num_codebooks, 20),
                                                                  generator=torch.Generator().manual_seed(1)))]
    right = Fusion(as_written)
    codes = codes_of(engine_with(bf16_engine, right), context, options)
    assert right.off is None and codes.shape[1] == options.max_frames
    wrong = Fusion(Perturbing(wrong_code=True))
    codes_of(engine_with(bf16_engine, wrong), context, options)
    assert wrong.off is not None and "below the best choice" in wrong.off


def test_compiled_code_is_kept_in_companions_cache_unless_the_user_chose_a_place(tmp_path, monkeypatch) -> None:
    from companion.engine.fused import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "compiled")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_the_place_importing_torch_dynamo_sets_is_no_choice_of_the_users(tmp_path, monkeypatch) -> None:
    """Importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR to inductor's default (a folder under /tmp
    that a reboot empties): companion's cache replaces it, in a fresh process as the product starts."""
    import subprocess
    import sys

    code = ("import os, torch._dynamo; before = os.environ['TORCHINDUCTOR_CACHE_DIR']\n"
            "from companion.engine.engine import fusion_for\n"
            "fusion_for('on', torch.device('cpu')); print(before); print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["COMPANION_HOME"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert os.path.basename(before).startswith("torchinductor_")
    assert after == str((tmp_path / "home").resolve() / "cache" / "compiled")


def test_the_relative_difference_holds_for_small_hidden_states() -> None:
    """Relative to the hidden state's own size, however small (not to 1)."""
    replayed, eager, gaps = frames_with(2e-4)
    small = [(c, h * 1e-3) for c, h in replayed], [(c, h * 1e-3) for c, h in eager]
    assert agreement(*small, gaps, TOLERANCE[torch.float32]) is not None


def test_forced_pick_gaps_are_relative_to_the_largest_finite_score() -> None:
    """A sampled unit's scores past its top-k are -inf; gaps are relative to the largest finite score,
    however small the scores are (not to 1), and a candidate that is not the best is measured exactly."""
    from companion.engine.sampling import Sampler
    from companion.engine.self_check import ForcedPicks

    logits = torch.tensor([[0.004, 0.002, -0.003, 0.0035]])
    greedy = Sampler(0.0, 1, 0, torch.device("cpu"), 1)
    forced = ForcedPicks(greedy, torch.tensor([[3]]), torch.tensor([True]))
    forced(logits)
    assert float(forced.gaps[0]) == pytest.approx((0.004 - 0.0035) / 0.004, rel=1e-5)
    masked = Sampler(1.0, 4, 3, torch.device("cpu"), 1, width=4, vocab=4)  # ranks every code, masks past top-k
    masked.configure(1.0, 2, 3)
    masked.begin_frame()
    scores, indices = masked.scores(logits * 1000, 0)
    assert torch.isinf(scores).sum() == 2  # two ranks masked
    order = scores[0].argsort(descending=True)
    best, second = int(indices[0, order[0]]), int(indices[0, order[1]])
    forced = ForcedPicks(masked, torch.tensor([[second]]), torch.tensor([True]))
    forced(logits * 1000)
    finite = scores[torch.isfinite(scores)]
    expected = float((finite.max() - scores[0, order[1]]) / finite.abs().max())
    assert best != second and float(forced.gaps[0]) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_a_code_just_above_the_kth_is_sure_only_by_more_than_the_tolerance() -> None:
    """Code 3 is 0.02 above the k-th logit (code 1), the tolerance 0.01 of the largest logit 5 is 0.05:
    code 3 is not surely in the top-3, so a pick that it would have beaten is close."""
    from companion.engine.sampling import Sampler
    from companion.engine.self_check import ForcedPicks

    logits = torch.tensor([[5.0, 2.0, -3.0, 2.02]])
    for seed in range(200):
        sampled = Sampler(1.0, 3, seed, torch.device("cpu"), 1, vocab=4)
        sampled.begin_frame()
        if int(sampled.pick(logits, 0)[0]) == 3:  # the noise made code 3 the best
            forced = ForcedPicks(sampled, torch.tensor([[0]]), torch.tensor([True]), tolerance=0.01)
            forced(logits)
            assert float(forced.gaps[0]) == 0.0
            return
    raise AssertionError("no seed made code 3 the best")


def test_the_compilers_vector_check_starts_early_on_a_cpu_only() -> None:
    """Inductor's once-a-process check of the CPU's vector instructions (a test program built and loaded
    in a fresh Python) starts beside the model's loading: done, the first compile finds its answer."""
    from torch._inductor import cpu_vec_isa

    from companion.engine import fused

    for earlier in [t for t in threading.enumerate() if t.name == "companion-compiler-check"]:
        earlier.join(300)  # an engine of another test may have started one
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    assert fused.check_compiler_early(torch.device("meta")) is None  # nothing to compile C++ for
    assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0
    check = fused.check_compiler_early(torch.device("cpu"))
    assert check is not None and check.name == "companion-compiler-check"
    assert check.daemon  # never keeps the program from exiting
    check.join(300)
    assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 1
