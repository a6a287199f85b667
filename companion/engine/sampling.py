"""Choosing a code from logits: greedy, or temperature + top-k with a seedable generator."""

from __future__ import annotations

import torch


class Sampler:
    """Callable `(1, V)` logits -> `(1,)` int64 code.

    ``codes`` limits the candidates to the codes Mimi can decode: csm-1b's audio vocabulary has 2051
    entries but Mimi only 2048 codes (the last 3 are never right to emit, and would crash the decoder).

    Greedy (argmax, as transformers' ``do_sample=False``) when ``temperature`` is 0 or ``topk`` is 1;
    otherwise logits / temperature, keep the top-k, softmax and draw with ``generator``.
    """

    def __init__(
        self, temperature: float, topk: int, seed: int | None, device: torch.device, codes: int | None = None
    ) -> None:
        self.greedy = temperature <= 0.0 or topk <= 1
        self.codes = codes  # only the first ``codes`` logits are candidates (None: all)
        self.temperature = temperature
        self.topk = topk
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.codes is not None:
            logits = logits[..., : self.codes]
        if self.greedy:  # argmax is the same on the float32 copy transformers makes: skip the copy
            return logits.argmax(dim=-1)
        scores = logits.to(torch.float32)
        # Step 1: temperature, then keep the k best (the rest get -inf).
        scores = scores / self.temperature
        k = min(self.topk, scores.shape[-1])
        values, indices = torch.topk(scores, k, dim=-1)
        # Step 2: draw one of the k from their softmax.
        probs = torch.softmax(values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)  # (1, 1) index into the top k
        return indices.gather(-1, choice)[:, 0]
