"""Choosing a code from logits: greedy, or temperature + top-k with a seedable generator."""

from __future__ import annotations

import torch


class Sampler:
    """Callable `(1, V)` logits -> `(1,)` int64 code, once per codebook of a frame.

    Greedy (argmax, as transformers' ``do_sample=False``) when ``temperature`` is 0 or ``topk`` is 1.
    Otherwise top-k sampling by the Gumbel-max trick: ``argmax(logits_k / temperature + g)`` over the k
    best logits, with ``g = -log(-log(u))`` and ``u`` uniform, draws from exactly ``softmax(logits_k /
    temperature)``. The uniforms for a whole frame `(K, width)` are drawn by ``begin_frame()`` from the
    seeded generator into a fixed buffer, so the per-codebook work has static shapes and no host
    round trip (what a CUDA graph needs).

    Temperature and top-k live in 0-dim device tensors that ``configure()`` overwrites in place, so a
    captured graph keeps reading them. ``width`` is how many best logits are ranked: top-k by default
    (the eager path: exactly k), or a fixed width (every decodable code, for a graph) in which ranks
    ``>= topk`` are masked out, so one graph serves every top-k.

    ``codes`` limits the candidates to the codes Mimi can decode: csm-1b's audio vocabulary has 2051
    entries but Mimi only 2048 codes (the last 3 are never right to emit, and would crash the decoder).
    ``vocab`` is the logits' width: a top-k above the candidates there are is clamped to them.

    The same seed gives the same codes whatever the width: every sampler draws one uniform per candidate
    code `(K, codes or vocab)` each frame and code ``c`` uses the uniform in column ``c``, so the eager path
    (exactly k ranked) and a graph's (every candidate ranked, ranks past k masked) add the same noise to
    each code. Noise follows codes, not ranks: logits that differ by a rounding step (another kernel, a
    compiled step) and swap two codes' ranks change no code's score by more than that step.
    """

    def __init__(
        self,
        temperature: float,
        topk: int,
        seed: int | None,
        device: torch.device,
        num_codebooks: int,
        codes: int | None = None,
        width: int | None = None,
        vocab: int | None = None,
    ) -> None:
        self.greedy = temperature <= 0.0 or topk <= 1
        self.codes = codes
        self.generator = torch.Generator(device=device)
        known = [c for c in (codes, vocab) if c]
        candidates = min(known) if known else None  # codes a logit row may give
        if not self.greedy and candidates is None:
            raise ValueError("a sampling Sampler needs codes or vocab: its noise has a column per code")
        if self.greedy:
            self.width = 1
        else:
            self.width = width if width is not None else min(topk, candidates or topk)
        self.masked = width is not None and not self.greedy  # ranks beyond top-k are masked at run time
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.topk = torch.full((), self.width, dtype=torch.long, device=device)
        self._ranks = torch.arange(self.width, device=device)  # (width,)
        # (K, candidates) uniforms, one per code (the same draw whatever ``width`` is).
        columns = 1 if self.greedy else candidates
        self.noise = torch.full((num_codebooks, columns or 1), 0.5, device=device)
        self.row = 0
        self.configure(temperature, topk, seed)

    def configure(self, temperature: float, topk: int, seed: int | None) -> None:
        """Set the temperature, top-k and seed in place (the tensors a graph reads stay the same)."""
        if not self.greedy:
            self.temperature.fill_(temperature)
            self.topk.fill_(min(topk, self.width))
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def begin_frame(self) -> None:
        """Draw the uniforms of the next frame; the next call samples codebook 0."""
        self.row = 0
        if not self.greedy:
            self.noise.uniform_(generator=self.generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        row, self.row = self.row, self.row + 1
        return self.pick(logits, row)

    def pick(self, logits: torch.Tensor, row: int | torch.Tensor) -> torch.Tensor:
        """The code of codebook ``row`` (an int, or a `(1,)` device tensor in a compiled step)."""
        return best(*self.scores(logits, row))

    def scores(self, logits: torch.Tensor, row: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``pick`` takes the best of: `(B, n)` scores and the codes of their columns (None: the
        column is the code, greedy)."""
        if self.codes is not None:
            logits = logits[..., : self.codes]
        if self.greedy:  # argmax is the same on the float32 copy transformers makes: skip the copy
            return logits, None
        # Rank the best logits, scale by the temperature, add Gumbel noise, take the best of the top k.
        values, indices = torch.topk(logits.to(torch.float32), self.width, dim=-1)
        noise = self.noise[row] if isinstance(row, int) else self.noise.index_select(0, row)[0]  # (candidates,)
        scores = values / self.temperature - torch.log(-torch.log(noise[indices]))
        if self.masked:
            scores = scores.masked_fill(self._ranks >= self.topk, float("-inf"))
        return scores, indices


class RowSamplers:
    """The eager sampler of several streams: row ``b`` of the logits is sampled by ``samplers[b]`` (that
    stream's own Sampler, seed and noise); a row without one is padding (its code is thrown away).

    When every stream samples the same way (all greedy, or all with the same top-k), the rows are
    sampled in one call per operation instead of one per stream: the same operations on the same
    values, row by row, so the codes are those each Sampler would give."""

    def __init__(self, samplers: list[Sampler | None]) -> None:
        self.samplers = samplers
        real = [s for s in samplers if s is not None]
        kinds = {(s.greedy, s.width, s.codes) for s in real}
        self.together = len(kinds) == 1 and all(type(s) is Sampler for s in real)  # not for other samplers
        self._first = real[0]
        self._temperature: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self.row = 0

    def begin_frame(self) -> None:
        for s in self.samplers:
            if s is not None:
                s.begin_frame()
        self.row = 0
        self._noise = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.together:  # each stream's own sampler; padding rows get code 0 (no sampler's turn used)
            pad = torch.zeros(1, dtype=torch.long, device=logits.device)
            return torch.cat([s(logits[b : b + 1]) if s is not None else pad for b, s in enumerate(self.samplers)])
        first = self._first
        if first.codes is not None:
            logits = logits[..., : first.codes]
        row, self.row = self.row, self.row + 1
        if first.greedy:
            return logits.argmax(dim=-1)
        if self._noise is None:  # this frame's noise and the temperatures, one row per stream
            rows = [s or first for s in self.samplers]
            self._noise = torch.stack([s.noise for s in rows], dim=1)  # (K, B, candidates)
            self._temperature = torch.stack([s.temperature for s in rows])[:, None]  # (B, 1)
        assert self._temperature is not None
        values, indices = torch.topk(logits.to(torch.float32), first.width, dim=-1)
        scores = values / self._temperature - torch.log(-torch.log(self._noise[row].gather(-1, indices)))
        return indices.gather(-1, scores.argmax(dim=-1, keepdim=True))[:, 0]


class BatchSampler:
    """A replayable unit's sampler for B streams with static shapes: row ``b`` samples as that stream's
    own Sampler does (its temperature, top-k and the noise it drew, copied in by ``load``), ranking every
    candidate code and masking ranks past the row's top-k, like a one-stream unit's Sampler. Greedy units
    take the argmax of every row."""

    def __init__(self, rows: int, greedy: bool, device: torch.device, num_codebooks: int,
                 codes: int | None, vocab: int) -> None:  # fmt: skip
        self.greedy = greedy
        self.codes = codes
        self.width = 1 if greedy else (codes or vocab)
        self.temperature = torch.ones(rows, 1, dtype=torch.float32, device=device)
        self.topk = torch.full((rows, 1), self.width, dtype=torch.long, device=device)
        self._ranks = torch.arange(self.width, device=device)
        self.noise = torch.full((rows, num_codebooks, self.width), 0.5, device=device)
        self.row = 0

    def load(self, row: int, temperature: float, topk: int, noise: torch.Tensor | None) -> None:
        """Row ``row`` samples with ``temperature``, ``topk`` and `(K, width)` ``noise`` (sampled units)."""
        if not self.greedy:
            self.temperature[row].fill_(temperature)
            self.topk[row].fill_(min(topk, self.width))
            if noise is not None:
                self.noise[row].copy_(noise[:, : self.width])

    def begin_frame(self) -> None:
        self.row = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        row, self.row = self.row, self.row + 1
        return self.pick(logits, row)

    def pick(self, logits: torch.Tensor, row: int | torch.Tensor) -> torch.Tensor:
        """The codes of codebook ``row`` (an int, or a `(1,)` device tensor in a compiled step)."""
        return best(*self.scores(logits, row))

    def scores(self, logits: torch.Tensor, row: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``pick`` takes the best of (as ``Sampler.scores``), each row with its own sampling."""
        if self.codes is not None:
            logits = logits[..., : self.codes]
        if self.greedy:
            return logits, None
        values, indices = torch.topk(logits.to(torch.float32), self.width, dim=-1)
        noise = self.noise[:, row] if isinstance(row, int) else self.noise.index_select(1, row)[:, 0]
        scores = values / self.temperature - torch.log(-torch.log(noise.gather(-1, indices)))
        return scores.masked_fill(self._ranks >= self.topk, float("-inf")), indices


def best(scores: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """`(B,)` the code of each row's best score (``indices``: the codes of the columns; None: the column)."""
    if indices is None:
        return scores.argmax(dim=-1)
    return indices.gather(-1, scores.argmax(dim=-1, keepdim=True))[:, 0]
