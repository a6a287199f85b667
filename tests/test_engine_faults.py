"""Faults in the middle of a turn: an exception inside an attention call, a cancel during a prefill.

The fault is injected by wrapping ``torch.nn.functional.scaled_dot_product_attention``, which the
engine's decoder stacks call once per layer; the engine itself is the real one. After the fault, the
same turn must give exactly a fresh engine's codes, and a cancel must stop the prefill at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from companion.engine import Engine, GenerationOptions, Segment
from companion.engine.frames import PREFILL_CHUNK

GREEDY = GenerationOptions(temperature=0.0, topk=1, max_frames=6)
REAL_SDPA = F.scaled_dot_product_attention


class Injected(RuntimeError):
    """The fault a test injects (think: CUDA out of memory in the middle of a forward)."""


class Attention:
    """Counts the backbone's prefill attention calls (several queries over the prompt, not the depth
    decoder's 2-position first step nor Mimi's) and the positions they process; ``on_call(index)`` runs
    first."""

    def __init__(self, on_call: Callable[[int], None] = lambda index: None, slow: float = 0.0) -> None:
        self.on_call, self.slow = on_call, slow
        self.calls = 0
        self.positions = 0  # query positions processed by finished prefill attention calls
        self.feeds = 0  # one-query backbone calls (frames fed back), told apart by their long key length

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if "enable_gqa" not in kwargs:  # Mimi's decoder, not the CSM transformers
            return real_attention(q, k, *args, **kwargs)
        if q.shape[-2] > 2:
            self.on_call(self.calls)
            self.calls += 1
            time.sleep(self.slow * q.shape[-2] * k.shape[-2])  # slower in proportion to the work
            out = real_attention(q, k, *args, **kwargs)
            self.positions += q.shape[-2]
            return out
        if q.shape[-2] == 1 and k.shape[-2] > 40:
            self.on_call(-1 - self.feeds)
            self.feeds += 1
        return real_attention(q, k, *args, **kwargs)


def real_attention(*args, **kwargs) -> torch.Tensor:
    """The real SDPA with the real function in place: a lower-right causal bias dispatches itself only
    when ``F.scaled_dot_product_attention`` is the function it was called through."""
    spy = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = REAL_SDPA
    try:
        return REAL_SDPA(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = spy


@contextmanager
def attention(monkeypatch: pytest.MonkeyPatch, spy: Attention) -> Iterator[Attention]:
    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy)
        yield spy


def fresh(tiny_engine: Engine, max_seq_len: int = 512) -> Engine:
    return Engine(tiny_engine.model, tiny_engine.processor, "faults", max_seq_len=max_seq_len)


def codes_of(engine: Engine, context: list[Segment], text: str, cancel: threading.Event | None = None) -> torch.Tensor:
    chunks = list(engine.stream(context, 0, text, GREEDY, cancel))
    return torch.cat([c.codes for c in chunks], dim=1) if chunks else torch.zeros(engine.num_codebooks, 0)


def layers(engine: Engine) -> int:
    return len(engine.loop.backbone.layers)


def raise_at(index: int) -> Callable[[int], None]:
    def on_call(i: int) -> None:
        if i == index:
            raise Injected(f"fault in attention call {i}")

    return on_call


@pytest.fixture(scope="module")
def reference(tiny_engine: Engine, speech_24k) -> list[Segment]:
    return [Segment(0, "This is how I sound.", tiny_engine.encode(speech_24k("narrator.mp3", 3.0)))]


def test_an_exception_inside_a_chunked_prefill_then_the_same_turn(
    tiny_engine: Engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh(tiny_engine)
    engine.loop.chunk = 16  # several chunks on a short prompt
    rows = engine.prompt.prompt_rows(reference, 0, "Once more.")
    assert len(rows) > 3 * 16
    # The fault: the second layer of the third chunk.
    with attention(monkeypatch, Attention(raise_at(2 * layers(engine) + 1))), pytest.raises(Injected):
        codes_of(engine, reference, "Once more.")
    # Only the two finished chunks are claimed, and they are what the prompt says.
    assert engine.loop.length == 32 and torch.equal(engine.loop.rows, rows[:32])
    again = codes_of(engine, reference, "Once more.")
    assert engine.last_stats.prefill_positions == len(rows) - 32
    assert torch.equal(again, codes_of(fresh(tiny_engine), reference, "Once more."))


def test_an_exception_in_a_prefill_after_a_reused_prefix(
    tiny_engine: Engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh(tiny_engine)
    codes_of(engine, reference, "A first turn, rather long.")
    with attention(monkeypatch, Attention(raise_at(layers(engine) - 1))), pytest.raises(Injected):
        codes_of(engine, reference, "Then another one.")  # the fault: in the last layer
    assert torch.equal(engine.loop.rows, engine.prompt.prompt_rows(reference, 0, "Then another one.")[: engine.loop.length])
    again = codes_of(engine, reference, "Then another one.")
    assert torch.equal(again, codes_of(fresh(tiny_engine), reference, "Then another one."))


def test_an_exception_while_feeding_a_frame_then_the_same_turn(
    tiny_engine: Engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fresh(tiny_engine)
    third_feed_second_layer = -1 - (2 * layers(engine) + 1)  # feeds count -1, -2, ... layer by layer
    with attention(monkeypatch, Attention(raise_at(third_feed_second_layer))), pytest.raises(Injected):
        codes_of(engine, reference, "Feed me.")
    prompt = len(engine.prompt.prompt_rows(reference, 0, "Feed me."))
    assert engine.loop.length == prompt + 2  # the prompt and the two frames fed before the fault
    again = codes_of(engine, reference, "Feed me.")
    assert torch.equal(again, codes_of(fresh(tiny_engine), reference, "Feed me."))


def test_a_cancel_in_the_middle_of_a_prefill_stops_it_at_once(
    tiny_engine: Engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C from another thread while a (slowed) attention call of the second chunk is running."""
    engine = fresh(tiny_engine)
    engine.loop.chunk = 16
    assert layers(engine) >= 2
    cancel, pressed = threading.Event(), threading.Event()
    seen = {"calls_until_cancel": -1}

    def on_call(i: int) -> None:
        if i == layers(engine):  # the second chunk's first layer
            pressed.set()  # the user presses Ctrl-C now ...
            assert cancel.wait(timeout=60)  # ... and this call ends after the REPL has set the event
            seen["calls_until_cancel"] = i + 1

    canceller = threading.Thread(target=lambda: pressed.wait(60) and cancel.set())
    canceller.start()
    with attention(monkeypatch, Attention(on_call, slow=1e-7)) as spy:
        codes = codes_of(engine, reference, "Stop me early.", cancel)
    canceller.join()
    assert codes.shape[1] == 0  # no audio
    assert spy.calls == seen["calls_until_cancel"]  # not one attention call after the cancel
    assert spy.positions == layers(engine) * 16 + 16  # the first chunk, then one layer of the second
    assert engine.loop.length == 16 and engine.last_stats.prefill_positions == 16
    again = codes_of(engine, reference, "Stop me early.")
    assert torch.equal(again, codes_of(fresh(tiny_engine), reference, "Stop me early."))


def test_a_long_prefill_runs_in_chunks_and_stops_between_them(
    tiny_engine: Engine, speech_24k, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 45 s reference at the real chunk size (three chunks): a cancel set during the first chunk's last layer lets
    that chunk finish (and be kept) and no layer of the next one run."""
    engine = fresh(tiny_engine, max_seq_len=1024)
    long_ref = [Segment(0, "A long reference.", engine.encode(speech_24k("narrator.mp3", 45.0)))]
    total = len(engine.prompt.prompt_rows(long_ref, 0, "Long."))
    assert total > 2 * PREFILL_CHUNK
    cancel = threading.Event()
    spy = Attention(lambda i: cancel.set() if i == layers(engine) - 1 else None)
    with attention(monkeypatch, spy):
        assert codes_of(engine, long_ref, "Long.", cancel).shape[1] == 0
    assert spy.calls == layers(engine) and spy.positions == layers(engine) * PREFILL_CHUNK
    assert engine.loop.length == PREFILL_CHUNK  # the finished chunk is kept: a retry starts after it
    # Without a cancel: every chunk, and the codes of one unchunked prefill.
    with attention(monkeypatch, Attention()) as rest:
        chunked = codes_of(engine, long_ref, "Long.")
    assert rest.positions == layers(engine) * (total - PREFILL_CHUNK)
    assert rest.calls == layers(engine) * -(-(total - PREFILL_CHUNK) // PREFILL_CHUNK)
    unchunked = fresh(tiny_engine, max_seq_len=1024)
    unchunked.loop.chunk = total
    assert torch.equal(chunked, codes_of(unchunked, long_ref, "Long."))


def test_a_cancel_while_a_chunk_is_generated_yields_nothing_more(
    tiny_engine: Engine, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are 2, 4, 8 ... frames: a cancel set while the 4th frame is fed (inside the second chunk)
    yields neither that chunk nor a partial one."""
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=12)
    whole = list(fresh(tiny_engine).stream(reference, 0, "Cancel me inside a chunk.", options))
    assert [c.codes.shape[1] for c in whole] == [2, 4, 6]  # the turn runs past the second chunk
    cancel = threading.Event()

    engine = fresh(tiny_engine)

    def on_call(index: int) -> None:
        if index == -1 - 3 * layers(engine):  # the first layer of the 4th frame fed back
            cancel.set()

    with attention(monkeypatch, Attention(on_call)):
        chunks = list(engine.stream(reference, 0, "Cancel me inside a chunk.", options, cancel))
    assert [c.codes.shape[1] for c in chunks] == [2]
    assert torch.equal(chunks[0].codes, whole[0].codes)
