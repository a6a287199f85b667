"""The CUDA-graph frame step and the Gumbel-max sampler, run eagerly on CPU.

Capture itself needs a GPU; what is captured (``GraphedFrame.step``: static-shape backbone step with
a position mask, sampling from a fixed noise buffer) is plain torch and is checked here; the logic
around capture is in test_engine_graphs.py."""

from __future__ import annotations

import torch

from companion.engine import Engine, GenerationOptions
from companion.engine.cuda_graphs import Capture
from companion.engine.sampling import Sampler
from companion.engine.unit import GraphedFrame


def test_static_step_gives_the_eager_greedy_codes(tiny_engine: Engine) -> None:
    engine = Engine(tiny_engine.model, tiny_engine.processor, "graph-step", max_seq_len=128)
    options = GenerationOptions(temperature=0.0, topk=1, max_frames=10)
    eager = torch.cat([c.codes for c in engine.stream([], 0, "Graph me.", options)], dim=1).T
    # The same prompt again, frames from the static step (eagerly: capture=False).
    rows = engine.prompt.prompt_rows([], 0, "Graph me.")
    engine.loop.reset()
    hidden, _ = engine.loop.prefill(rows)
    sampler = Sampler(0.0, 1, 0, engine.device, engine.num_codebooks)
    unit = GraphedFrame(engine.loop, sampler)
    unit.replay = Capture().record(unit)  # the step itself, after a warm-up at the scratch position
    static = torch.stack(list(unit.frames(hidden, 10)))
    assert torch.equal(static, eager)
    # Every frame was fed (and recorded), as the captured graph does.
    assert engine.loop.length == len(rows) + 10
    assert torch.equal(engine.loop.rows[len(rows) :, 1:], eager)


def test_gumbel_top_k_sampling_follows_the_softmax() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]  # (1, 4)
    sampler = Sampler(1.0, 3, 7, torch.device("cpu"), num_codebooks=1, vocab=4)
    counts = torch.zeros(4)
    for _ in range(6000):
        sampler.begin_frame()
        counts[sampler(logits)] += 1
    assert counts[3] == 0  # outside the top 3
    expected = probs[:3] / probs[:3].sum()
    assert torch.allclose(counts[:3] / counts.sum(), expected, atol=0.02)


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = Sampler(0.05, 3, 1, torch.device("cpu"), num_codebooks=1, vocab=3)
    picks = set()
    for _ in range(200):
        cold.begin_frame()
        picks.add(int(cold(logits)))
    assert picks == {0}


def test_codes_mimi_cannot_decode_are_never_picked() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0]])  # the best logit is at index 2
    greedy = Sampler(0.0, 1, 0, torch.device("cpu"), num_codebooks=1, codes=2)
    greedy.begin_frame()
    assert int(greedy(logits)) == 1
