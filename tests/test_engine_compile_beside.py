"""Compiling frames beside generation (``Fusion(background=True)``, the process's ``FUSION``), on a CPU.

The compile runs in its own thread on a twin of the frame loop; turns go on without it until it is
done. ``Held`` holds the compile until the test lets it go, so each test knows which side of the
compile a turn is on (no timing is involved).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine_fused import SAMPLED, Perturbing, as_written, codes_of, engine_with
from test_engine_graphs import Recorder

from companion.engine import Engine, Segment
from companion.engine.fused import Compiling, Fusion, first_compile_notice

GREEDY_TOO = dataclasses.replace(SAMPLED, temperature=0.0, topk=1)
TEXT_AGAIN = "Once more, from the top."


class Held:
    """A compiler that waits until ``release`` is set before compiling (with ``then``), noting the
    threads it compiled in and the units whose pieces it compiled."""

    def __init__(self, then: Callable[[Callable[..., Any]], Callable[..., Any]] = as_written) -> None:
        self.release = threading.Event()
        self.then = then
        self.threads: set[str] = set()
        self.units: list[Any] = []

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.threads.add(threading.current_thread().name)
        unit = fn.__self__.unit  # type: ignore[attr-defined]  # a piece of a FusedStep
        if unit not in self.units:
            self.units.append(unit)
        if not self.release.wait(120):
            raise TimeoutError("the test never let the compile go")
        return self.then(fn)


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 1.5)))]


def caches(engine: Engine) -> list[torch.Tensor]:
    """Every key and value the engine's turns read (backbone and depth decoder), copied."""
    loop = engine.loop
    return [t.clone() for stack in (loop.backbone, loop.depth) for t in (*stack.keys, *stack.values)]


def test_turns_go_on_without_the_compile_and_the_next_turn_after_it_uses_it(tiny_engine: Engine, reference) -> None:
    held = Held()
    fusion = Fusion(held, background=True)
    engine, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    try:
        # While it compiles: the turn is the step-by-step loop's, exactly; a hang-up mid-turn changes nothing.
        assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
        stream = engine.stream(reference, 0, "Hung up on.", SAMPLED)
        next(stream)
        stream.close()
        assert engine.graphs is not None and engine.graphs.units == {} and fusion.busy
        assert engine.wait_compiled(timeout=0) is False
        before = caches(engine)
    finally:
        held.release.set()
    assert engine.wait_compiled(timeout=120)
    # The compile's trial frame wrote its twin's caches, not one value a turn reads.
    assert all(torch.equal(a, b) for a, b in zip(before, caches(engine), strict=True))
    assert held.threads == {"companion-compile"} and not fusion.busy
    # It compiled the kind of frame the turn asked for, on a twin: the same weights, its own caches.
    [twin] = held.units
    assert twin.loop is not engine.loop and twin.loop.model is engine.model
    assert twin.loop.backbone.keys[0].data_ptr() != engine.loop.backbone.keys[0].data_ptr()
    assert not twin.sampler.greedy and twin.sampler.width == SAMPLED.topk and twin.batch == 1
    # The next turn records the compiled unit, checks it on its own state, and speaks with it.
    assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
    assert fusion.off is None and [u.fused for u in engine.graphs.units.values()] == [True]
    assert engine.graphs.checked == {(1, False, SAMPLED.topk)}
    assert held.threads == {"companion-compile", "MainThread"}  # the unit's own pieces, already released


def test_the_compile_starts_once_the_turns_first_audio_is_out(tiny_engine: Engine, reference) -> None:
    """Compiling holds Python's lock much of the time: it waits for the first audio, so as not to delay it."""
    held = Held()
    fusion = Fusion(held, background=True)
    engine = engine_with(tiny_engine, fusion)
    try:
        stream = engine.stream(reference, 0, "First things first.", SAMPLED)
        next(stream)  # the first audio
        assert engine.graphs is not None and engine.graphs.jobs == {} and not fusion.busy
        assert list(engine.graphs.wanted) == [(1, False, SAMPLED.topk)]
        next(stream)
        assert fusion.busy and engine.graphs.wanted == {}
        stream.close()
    finally:
        held.release.set()
    assert engine.wait_compiled(timeout=120)


def test_a_turn_closed_at_its_first_audio_leaves_the_compile_to_the_next_turn(tiny_engine: Engine, reference) -> None:
    held = Held()
    fusion = Fusion(held, background=True)
    engine, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    try:
        stream = engine.stream(reference, 0, "Gone at once.", SAMPLED)
        next(stream)
        stream.close()
        assert engine.graphs is not None and engine.graphs.jobs == {} and not fusion.busy
        second = engine.stream(reference, 0, TEXT_AGAIN, SAMPLED)
        first_chunk = next(second)  # asked again: started with this turn, which goes on without it
        assert fusion.busy and engine.graphs.wanted == {}
        codes = torch.cat([first_chunk.codes, *(c.codes for c in second)], dim=1)
        assert torch.equal(codes, torch.cat([c.codes for c in eager.stream(reference, 0, TEXT_AGAIN, SAMPLED)], dim=1))
    finally:
        held.release.set()
    assert engine.wait_compiled(timeout=120)


def test_a_compile_that_fails_beside_a_turn_is_said_in_one_line_by_the_next_turn(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    compiler = Perturbing(raising=True)
    fusion = Fusion(compiler, background=True)
    engine, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        first = codes_of(engine, reference, SAMPLED)
        assert engine.wait_compiled(timeout=120)
        assert fusion.off is None  # nobody has looked yet
        second = codes_of(engine, reference, SAMPLED)
        third = codes_of(engine, reference, GREEDY_TOO)
    assert torch.equal(first, codes_of(eager, reference, SAMPLED)) and torch.equal(first, second)
    assert torch.equal(third, codes_of(eager, reference, GREEDY_TOO))
    assert fusion.off == ("compiling a frame failed (RuntimeError: InductorError: CppCompileError: C++ compile "
                          "error)")  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        f"compiled frames turned off for this run: {fusion.off}; generating without them (slower)"]
    assert compiler.compiled == ["_first"]  # not tried again for the greedy turn
    assert engine.graphs is not None and engine.graphs.units == {}


def test_a_compiled_frame_that_fails_its_check_after_compiling_beside_is_not_used(
    tiny_engine: Engine, reference
) -> None:
    fusion = Fusion(Perturbing(wrong_code=True), background=True)
    engine, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    codes_of(engine, reference, SAMPLED)
    assert engine.wait_compiled(timeout=120)
    assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
    assert fusion.off is not None and "self-check" in fusion.off
    assert engine.graphs is not None and engine.graphs.units == {}


def test_where_frames_are_recorded_the_steps_own_unit_serves_until_the_compiled_one_replaces_it(
    tiny_engine: Engine, reference
) -> None:
    """As on CUDA (the Recorder stands in for CUDA graphs): the step's own unit is recorded and checked
    first; nothing else is recorded while the compile runs; then the compiled unit takes its place."""
    held, recorder = Held(), Recorder()
    fusion = Fusion(held, background=True)
    engine, eager = engine_with(tiny_engine, fusion, recorder), engine_with(tiny_engine, None)
    try:
        assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
        assert engine.graphs is not None
        assert {k: u.fused for k, u in engine.graphs.units.items()} == {(1, False, None): False}
        assert engine.graphs.checked == {(1, False, None)} and recorder.captures == 1
        # Another kind of frame while it compiles: nothing recorded (on CUDA it would meet the compile).
        assert torch.equal(codes_of(engine, reference, GREEDY_TOO), codes_of(eager, reference, GREEDY_TOO))
        assert recorder.captures == 1 and list(engine.graphs.units) == [(1, False, None)]
    finally:
        held.release.set()
    assert engine.wait_compiled(timeout=120)
    assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
    assert {k: u.fused for k, u in engine.graphs.units.items()} == {(1, False, None): True}
    assert engine.graphs.checked == {(1, False, None)} and recorder.captures == 2
    assert all(recorder.prefix_intact) and fusion.off is None


def test_a_greedy_frame_compiles_as_greedy_beside_the_turn(tiny_engine: Engine, reference) -> None:
    held = Held()
    held.release.set()
    engine = engine_with(tiny_engine, Fusion(held, background=True))
    codes_of(engine, reference, GREEDY_TOO)
    assert engine.wait_compiled(timeout=120)
    [twin] = held.units
    assert twin.sampler.greedy and twin.batch == 1


class FailingForTheUnit:
    """Compiles beside generation, then fails to compile the unit itself (in the turn's thread)."""

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if threading.current_thread().name != "companion-compile":
            raise RuntimeError("InductorError: out of memory\nmore lines")
        return fn


def test_where_frames_are_recorded_a_unit_that_fails_to_compile_leaves_the_steps_own_unit_serving(
    tiny_engine: Engine, reference, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    fusion = Fusion(FailingForTheUnit(), background=True)
    engine, eager = engine_with(tiny_engine, fusion, recorder), engine_with(tiny_engine, None)
    codes_of(engine, reference, SAMPLED)
    assert engine.wait_compiled(timeout=120) and engine.graphs is not None
    with caplog.at_level(logging.WARNING, logger="companion.engine.cuda_graphs"):
        assert torch.equal(codes_of(engine, reference, SAMPLED), codes_of(eager, reference, SAMPLED))
    assert fusion.off == "compiling a frame failed (RuntimeError: InductorError: out of memory)"
    assert len(caplog.records) == 1
    # The step's own unit goes on, recorded once and checked once.
    assert {k: u.fused for k, u in engine.graphs.units.items()} == {(1, False, None): False}
    assert recorder.captures == 1 and engine.graphs.checked == {(1, False, None)}


def test_the_first_compile_beside_generation_is_said_before_it_starts(
    tiny_engine: Engine, reference, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from companion.engine import fused

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    monkeypatch.setattr(fused, "_told", set())
    engine = engine_with(tiny_engine, Fusion(as_written, background=True))
    with caplog.at_level(logging.WARNING, logger="companion.engine.fused"):
        codes_of(engine, reference, SAMPLED)
        assert engine.wait_compiled(timeout=120)
    assert [r.getMessage() for r in caplog.records] == [
        "compiling the speech model's frame step for this machine while it speaks (the first start only: a minute "
        "or more, and replies are slower until it is done; later starts reuse it, and engine.compile: off skips it)"]


def test_a_compile_job_says_when_it_is_done_and_what_it_raised() -> None:
    go = threading.Event()

    def work() -> None:
        assert go.wait(120)
        raise ValueError("no compiler here")

    job = Compiling(work)
    assert not job.done.is_set() and job.error is None
    # A thread the process does not wait for by itself: its exit handler does, and says so.
    assert job.thread.daemon and job.thread.name == "companion-compile"
    go.set()
    assert job.done.wait(120)
    assert isinstance(job.error, ValueError) and str(job.error) == "no compiler here"
    assert Compiling(lambda: None).done.wait(120)


def test_a_fusion_is_busy_while_any_of_its_compiles_runs() -> None:
    fusion = Fusion(background=True)
    go = threading.Event()
    first = fusion.start(lambda: None if go.wait(120) else None)
    for _ in range(2):  # later compiles that end at once leave the first one counted
        assert fusion.start(lambda: None).done.wait(120)
        assert fusion.busy
    go.set()
    assert first.done.wait(120)
    assert not fusion.busy


def test_the_exit_handler_returns_only_when_compile_threads_have_ended() -> None:
    from companion.engine import fused

    go = threading.Event()
    job = Compiling(lambda: None if go.wait(120) else None)
    assert job in fused._started
    threading.Thread(target=go.set).start()
    fused._finish_compiles()
    assert job.done.is_set() and not job.thread.is_alive()


def test_one_line_before_compiling_beside_generation_into_an_empty_cache(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from companion.engine import fused

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    monkeypatch.setattr(fused, "_told", set())
    with caplog.at_level(logging.WARNING, logger="companion.engine.fused"):
        first_compile_notice(background=True)
        first_compile_notice(background=True)
    assert [r.getMessage() for r in caplog.records] == [
        "compiling the speech model's frame step for this machine while it speaks (the first start only: a minute "
        "or more, and replies are slower until it is done; later starts reuse it, and engine.compile: off skips it)"]


def test_the_process_compiles_beside_generation() -> None:
    from companion.engine.fused import FUSION

    assert FUSION.background and FUSION.compiler is None


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")
def test_with_inductor_the_unit_finds_its_frame_compiled_on_the_twin(
    tiny_engine: Engine, reference, inductor_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile keys compiled code on the pieces' code and checks the tensors' shapes, not which
    tensors: the unit made after the compile on the twin compiles nothing more, and speaks right."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    torch._dynamo.reset()  # nothing compiled in this process before: the twin traces every piece
    fusion = Fusion(background=True)
    engine, eager = engine_with(tiny_engine, fusion), engine_with(tiny_engine, None)
    first = codes_of(engine, reference, GREEDY_TOO)
    assert engine.wait_compiled(timeout=600)
    traced = counters["stats"]["unique_graphs"]
    second = codes_of(engine, reference, GREEDY_TOO)
    assert counters["stats"]["unique_graphs"] == traced > 0
    assert fusion.off is None and engine.graphs is not None
    assert [u.fused for u in engine.graphs.units.values()] == [True]
    expected = codes_of(eager, reference, GREEDY_TOO)
    assert torch.equal(first, expected) and torch.equal(second, expected)


EXITING = """
import sys, threading, time, torch
from companion.engine.fused import Compiling
held = [torch.zeros(1000, 1000)]  # what a compile holds: dropped by its thread as it ends
forever = threading.Event()

def work(kept=held):
    if sys.argv[1] == "forever":
        forever.wait()
    time.sleep(0.5)  # still compiling when the main thread is done
    open(sys.argv[2], "w").write("compiled")

Compiling(work)
del held
print("main done", flush=True)
"""


def test_a_process_ending_while_a_frame_compiles_waits_for_it_and_exits_cleanly(tmp_path) -> None:
    import subprocess
    import sys

    marker = tmp_path / "compiled"
    done = subprocess.run([sys.executable, "-c", EXITING, "soon", str(marker)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "compiled"
    assert done.stderr.strip().splitlines() == [
        "finishing the speech model's frame compile before exiting (a minute at most, on a first start; Ctrl-C "
        "quits now)"]


def test_ctrl_c_while_exit_waits_for_a_compile_ends_the_process_at_once(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    marker = tmp_path / "compiled"
    proc = subprocess.Popen([sys.executable, "-c", EXITING, "forever", str(marker)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("finishing the speech model's frame compile before exiting")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    finally:
        proc.kill()
    assert not marker.exists()
