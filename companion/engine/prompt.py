"""The prompt as CSM sees it: one row per position, text tokens and audio frames.

Layout (the csm-1b chat template): every segment is ``<bos>[speaker]text<eos>``; a context segment
adds its audio frames and one all-zero end frame (the ``<|audio_eos|>`` position); the segment to be
spoken is its text only. A prompt is kept as ``rows``: an int64 tensor ``(P, K + 1)`` where a text
position is ``[token, -1, ..., -1]`` and an audio position is ``[-1, c_0, ..., c_{K-1}]``. Two prompts
share a KV prefix exactly as far as their rows are equal, which is what prefix reuse compares.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from companion.engine.types import Segment

NO_TOKEN = -1  # the text column of an audio row, and the code columns of a text row


class PromptBuilder:
    """Turns segments into rows with the checkpoint's own tokenizer."""

    def __init__(self, tokenizer: Any, num_codebooks: int) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # a fast tokenizer may refuse two threads at once ("Already borrowed")
        self.num_codebooks = num_codebooks
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)

    def text_ids(self, speaker: int, text: str) -> list[int]:
        """``<bos>[speaker]text<eos>`` as token ids (the special tokens split the text, as in the template)."""
        with self._lock:
            body = self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False)
        return [self.bos, *body, self.eos]

    def text_positions(self, speaker: int, text: str) -> int:
        return len(self.text_ids(speaker, text))

    def segment_positions(self, seg: Segment) -> int:
        """Text positions, plus the audio frames and the end frame when the segment has audio."""
        frames = 0 if seg.codes is None else int(seg.codes.shape[-1]) + 1
        return self.text_positions(seg.speaker, seg.text) + frames

    def segment_rows(self, seg: Segment) -> torch.Tensor:
        """`(n, K + 1)` rows of one segment."""
        ids = torch.tensor(self.text_ids(seg.speaker, seg.text), dtype=torch.long)
        text = torch.full((len(ids), self.num_codebooks + 1), NO_TOKEN, dtype=torch.long)
        text[:, 0] = ids
        if seg.codes is None:
            return text
        codes = seg.codes.to(device="cpu", dtype=torch.long)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"segment codes must be (K={self.num_codebooks}, T), got {tuple(codes.shape)}")
        # The audio frames, then the all-zero end frame.
        frames = torch.cat([codes.T, torch.zeros(1, self.num_codebooks, dtype=torch.long)])
        audio = torch.cat([torch.full((len(frames), 1), NO_TOKEN, dtype=torch.long), frames], dim=1)
        return torch.cat([text, audio])

    def prompt_rows(self, context: list[Segment], speaker: int, text: str) -> torch.Tensor:
        """`(P, K + 1)` rows of the context segments followed by the text to speak."""
        parts = [self.segment_rows(seg) for seg in context]
        parts.append(self.segment_rows(Segment(speaker, text, None)))
        return torch.cat(parts)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading rows on which `(n, K + 1)` ``a`` and `(m, K + 1)` ``b`` agree."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).any(dim=1).nonzero()
    return int(differ[0, 0]) if len(differ) else n
