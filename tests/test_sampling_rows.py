"""Sampling several streams' rows at once gives each row the code its own Sampler gives alone.

No model: logits are seeded random rows, so every case runs in milliseconds. ``RowSamplers`` (the eager
frame of several streams) and ``BatchSampler`` (a replayable unit's) are compared, frame by frame and
codebook by codebook, with one plain ``Sampler`` per stream made from the same options and seed.
"""

from __future__ import annotations

import pytest
import torch

from companion.engine.sampling import BatchSampler, RowSamplers, Sampler

CPU = torch.device("cpu")
K = 4  # codebooks a frame
VOCAB, CODES = 40, 37  # logits' width, and how many of them are decodable codes


def sampler(temperature: float, topk: int, seed: int, **kwargs) -> Sampler:  # noqa: ANN003
    return Sampler(temperature, topk, seed, CPU, K, CODES, vocab=VOCAB, **kwargs)


def frames_of_logits(rows: int, frames: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """Per frame, per codebook, `(rows, VOCAB)` logits; the undecodable columns are the largest."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(frames):
        frame = []
        for _ in range(K):
            logits = torch.randn(rows, VOCAB, generator=gen) * 2
            logits[:, CODES:] = 50.0  # never to be picked
            frame.append(logits.to(dtype))
        out.append(frame)
    return out


def alone(options: list[tuple[float, int, int]], logits: list[list[torch.Tensor]]) -> torch.Tensor:
    """Codes `(frames, rows, K)` of each row sampled by its own Sampler, one row at a time."""
    own = [sampler(*o) for o in options]
    codes = torch.zeros(len(logits), len(options), K, dtype=torch.long)
    for f, frame in enumerate(logits):
        for b, s in enumerate(own):
            s.begin_frame()
            for k, rows in enumerate(frame):
                codes[f, b, k] = s(rows[b : b + 1])[0]
    return codes


def together(samplers: list[Sampler | None], logits: list[list[torch.Tensor]]) -> torch.Tensor:
    rows = RowSamplers(samplers)
    codes = torch.zeros(len(logits), len(samplers), K, dtype=torch.long)
    for f, frame in enumerate(logits):
        rows.begin_frame()
        for k, x in enumerate(frame):
            codes[f, :, k] = rows(x)
    return codes


MIXES = {
    "sampled, one kind": [(0.9, 10, 1), (0.5, 10, 2), (1.3, 10, 3)],
    "greedy": [(0.0, 10, 1), (0.0, 5, 2), (0.7, 1, 3)],
    "greedy beside sampled": [(0.0, 10, 1), (0.9, 10, 2), (0.9, 10, 3)],
    "two top-ks": [(0.9, 10, 1), (0.9, 3, 2), (0.9, 10, 3)],
}


@pytest.mark.parametrize("options", MIXES.values(), ids=MIXES.keys())
def test_rows_sampled_together_are_each_rows_own_sampler(options: list[tuple[float, int, int]]) -> None:
    logits = frames_of_logits(len(options), frames=6)
    expected = alone(options, logits)
    assert torch.equal(together([sampler(*o) for o in options], logits), expected)
    assert (expected < CODES).all()  # never an undecodable code, though those logits are the largest
    if any(t > 0 and k > 1 for t, k, _ in options):  # the seeds matter: rows differ from greedy
        assert not torch.equal(expected, alone([(0.0, 1, s) for *_, s in options], logits))


def test_a_padding_row_leaves_the_real_rows_exact_and_draws_no_noise() -> None:
    """A row without a sampler (a slot nobody uses) is computed and thrown away: the real rows keep their
    own codes frame after frame, so the padding row took nothing from anybody's generator."""
    logits = frames_of_logits(3, frames=4)
    two_rows = [[x[[0, 2]] for x in frame] for frame in logits]
    for first in ((0.9, 10, 1), (0.0, 1, 1)):  # sampled together, and mixed with greedy
        got = together([sampler(*first), None, sampler(0.9, 10, 3)], logits)
        assert torch.equal(got[:, [0, 2]], alone([first, (0.9, 10, 3)], two_rows))


def test_a_sampler_of_another_kind_samples_its_own_row() -> None:
    """A subclass (the tests' teacher, a fault injector) is never folded into the shared call."""

    class Forced(Sampler):
        def __call__(self, logits: torch.Tensor) -> torch.Tensor:
            assert logits.shape == (1, VOCAB)
            return torch.tensor([CODES - 1])

    base = sampler(0.9, 10, 1)
    forced = Forced(0.9, 10, 2, CPU, K, CODES, vocab=VOCAB)
    logits = frames_of_logits(2, frames=2)
    got = together([base, forced], logits)
    assert (got[:, 1] == CODES - 1).all()
    assert torch.equal(got[:, :1], alone([(0.9, 10, 1)], [[x[:1] for x in frame] for frame in logits]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_a_units_batch_sampler_gives_each_rows_eager_codes(greedy: bool, dtype: torch.dtype) -> None:
    """Every candidate ranked and ranks past each row's top-k masked: the codes of the eager Sampler
    ranking exactly top-k, with the noise each row's Sampler drew."""
    options = [(0.0, 1, s) for s in (1, 2, 3)] if greedy else [(0.9, 10, 1), (0.4, 3, 2), (1.5, 37, 3)]
    logits = frames_of_logits(3, frames=6, dtype=dtype)
    expected = alone(options, logits)
    own = [sampler(*o) for o in options]
    unit = BatchSampler(3, greedy, CPU, K, CODES, VOCAB)
    for f, frame in enumerate(logits):
        unit.begin_frame()
        for b, (s, (t, k, _)) in enumerate(zip(own, options, strict=True)):
            s.begin_frame()
            unit.load(b, t, k, s.noise)
        for k, x in enumerate(frame):
            assert torch.equal(unit(x), expected[f, :, k]), (f, k)


def test_a_graphs_sampler_of_fixed_width_gives_the_eager_codes_for_every_top_k() -> None:
    """One width (every candidate) serves every top-k: ranks past it are masked at run time."""
    logits = frames_of_logits(1, frames=5)
    for topk in (1, 2, 10, 37, 100):
        expected = alone([(0.8, topk, 5)], logits)
        wide = sampler(0.8, 37, 5, width=CODES)
        wide.configure(0.8, topk, 5)
        got = torch.zeros_like(expected)
        for f, frame in enumerate(logits):
            wide.begin_frame()
            for k, x in enumerate(frame):
                got[f, 0, k] = wide(x)[0]
        assert torch.equal(got, expected), topk


def test_configure_changes_the_tensors_a_graph_reads_in_place() -> None:
    s = sampler(0.9, 10, 1, width=CODES)
    temperature, topk, noise = s.temperature, s.topk, s.noise
    s.configure(0.3, 4, 9)
    assert s.temperature is temperature and s.topk is topk and s.noise is noise
    assert s.temperature.item() == pytest.approx(0.3) and s.topk.item() == 4
    s.configure(0.3, 500, 9)
    assert s.topk.item() == CODES  # clamped to the width
    s.begin_frame()
    again = sampler(0.3, 4, 9, width=CODES)
    again.begin_frame()
    assert torch.equal(s.noise, again.noise)  # the new seed took


@pytest.mark.parametrize(("temperature", "topk", "greedy"), [(0.0, 50, True), (-1.0, 50, True), (0.9, 1, True),
                                                             (0.9, 0, True), (1e-3, 2, False)])  # fmt: skip
def test_greedy_when_temperature_is_not_above_zero_or_topk_at_most_one(temperature, topk, greedy) -> None:  # noqa: ANN001
    s = sampler(temperature, topk, 1)
    assert s.greedy is greedy and s.width == (1 if greedy else 2)


def test_a_top_k_above_the_candidates_is_clamped_to_them() -> None:
    assert sampler(0.9, 500, 1).width == CODES
    assert Sampler(0.9, 500, 1, CPU, K, None, vocab=VOCAB).width == VOCAB
    with pytest.raises(ValueError, match="needs codes or vocab"):  # its noise has a column per code
        Sampler(0.9, 500, 1, CPU, K)


def test_same_seed_same_codes_and_no_seed_draws_anew() -> None:
    logits = frames_of_logits(1, frames=8)
    assert torch.equal(alone([(1.0, 37, 4)], logits), alone([(1.0, 37, 4)], logits))
    a, b = Sampler(1.0, 37, None, CPU, K, CODES), Sampler(1.0, 37, None, CPU, K, CODES)
    a.begin_frame(), b.begin_frame()
    assert not torch.equal(a.noise, b.noise)


def test_sampled_frequencies_follow_the_softmax_over_the_top_k() -> None:
    """Logits 0, log 3 and one below the top-2: at temperature 1 the codes come 1 : 3, never the third.
    Seeded, so the count is the same every run."""
    s = Sampler(1.0, 2, 123, CPU, 1, vocab=3)
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0))), -5.0]])
    picks = []
    for _ in range(4000):
        s.begin_frame()
        picks.append(int(s(logits)[0]))
    share = picks.count(1) / len(picks)
    assert picks.count(2) == 0 and 0.72 < share < 0.78
    cold = Sampler(0.25, 2, 123, CPU, 1, vocab=3)  # a lower temperature sharpens: 3 ** 4 : 1
    cold_picks = []
    for _ in range(2000):
        cold.begin_frame()
        cold_picks.append(int(cold(logits)[0]))
    assert cold_picks.count(1) / len(cold_picks) > 0.97


@pytest.mark.parametrize("options", MIXES.values(), ids=MIXES.keys())
def test_bf16_logits_are_sampled_in_float32_the_same_way_by_every_sampler(options: list[tuple[float, int, int]]) -> None:
    """The model's bf16 logits are ranked and scaled in float32 by the one-stream, the several-streams and
    the graphs' samplers alike (bf16 ties and rounding would otherwise part them)."""
    logits = frames_of_logits(len(options), frames=4, seed=3, dtype=torch.bfloat16)
    expected = alone(options, logits)
    assert torch.equal(together([sampler(*o) for o in options], logits), expected)
    as_float = [[x.float() for x in frame] for frame in logits]
    assert torch.equal(alone(options, as_float), expected)  # what float32 logits of the same values give


def test_one_stream_among_padding_in_a_frame_of_several() -> None:
    logits = frames_of_logits(2, frames=3)
    for first in ((0.9, 10, 1), (0.0, 1, 1)):
        got = together([None, sampler(*first)], logits)
        assert torch.equal(got[:, 1:], alone([first], [[x[1:] for x in frame] for frame in logits]))
