"""Choosing a code from logits: greedy, or temperature + top-k with a seedable generator."""

from __future__ import annotations

import torch


class Sampler:
    """Callable `(1, V)` logits -> `(1,)` int64 code, once per codebook of a frame.

    Greedy (argmax, as transformers' ``do_sample=False``) when ``temperature`` is 0 or ``topk`` is 1.
    Otherwise top-k sampling by the Gumbel-max trick: ``argmax(logits_k / temperature + g)`` over the k
    best logits, with ``g = -log(-log(u))`` and ``u`` uniform, draws from exactly ``softmax(logits_k /
    temperature)``. The uniforms for a whole frame `(K, k)` are drawn by ``begin_frame()`` from the
    seeded generator into a fixed buffer, so the per-codebook work has static shapes and no host
    round trip (what a CUDA graph needs).

    ``codes`` limits the candidates to the codes Mimi can decode: csm-1b's audio vocabulary has 2051
    entries but Mimi only 2048 codes (the last 3 are never right to emit, and would crash the decoder).
    """

    def __init__(
        self,
        temperature: float,
        topk: int,
        seed: int | None,
        device: torch.device,
        num_codebooks: int,
        codes: int | None = None,
    ) -> None:
        self.greedy = temperature <= 0.0 or topk <= 1
        self.temperature = temperature
        self.topk = topk
        self.codes = codes
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        k = 1 if self.greedy else min(topk, codes or topk)
        self.noise = torch.empty(num_codebooks, k, device=device)  # (K, k) uniforms for one frame
        self.row = 0

    def begin_frame(self) -> None:
        """Draw the uniforms of the next frame; the next call samples codebook 0."""
        self.row = 0
        if not self.greedy:
            self.noise.uniform_(generator=self.generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.codes is not None:
            logits = logits[..., : self.codes]
        row, self.row = self.row, self.row + 1
        if self.greedy:  # argmax is the same on the float32 copy transformers makes: skip the copy
            return logits.argmax(dim=-1)
        # Keep the k best, scale by the temperature, add Gumbel noise, take the best.
        values, indices = torch.topk(logits.to(torch.float32), self.noise.shape[1], dim=-1)
        gumbel = -torch.log(-torch.log(self.noise[row]))
        choice = (values / self.temperature + gumbel).argmax(dim=-1, keepdim=True)
        return indices.gather(-1, choice)[:, 0]
