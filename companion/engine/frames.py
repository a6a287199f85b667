"""The frame loop: prefill the prompt, then one Mimi frame per step (backbone + depth decoder).

One frame: the backbone's last normed hidden state gives codebook 0 (``lm_head``); the depth decoder
starts with ONE call over two positions ``[backbone hidden, embed(c0)]`` and then predicts codebooks
2..K-1 one position at a time, each with its own head; the frame's K codebook embeddings are summed
and fed back to the backbone at the next position. Both transformers keep static KV caches.

The loop also remembers which rows (see ``prompt.py``) its backbone cache holds, so the next prompt
only prefills what differs (prefix reuse). That record changes only after the forward that wrote the
keys and values it claims has finished: an exception or a cancel in the middle of a call leaves a
record that is still true, so the next call is exactly what a fresh engine would do.

Prefill runs in chunks of ``PREFILL_CHUNK`` positions (bounding attention memory for long prompts),
and ``cancel`` is honoured before every layer of every chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from companion.engine.memory import PREFILL_CHUNK  # positions per prefill forward
from companion.engine.prompt import NO_TOKEN, common_prefix
from companion.engine.sampling import Sampler
from companion.engine.stack import DecoderStack, Stopped


class FrameLoop:
    """Owns the backbone and depth-decoder caches of one model and generates frames."""

    def __init__(self, model: Any, max_seq_len: int) -> None:
        cfg = model.config
        self.num_codebooks = cfg.num_codebooks
        self.vocab = cfg.vocab_size
        self.max_seq_len = max_seq_len
        backbone, depth = model.backbone_model, model.depth_decoder.model
        # Step 1: the two transformers with static caches (the depth decoder needs K + 1 positions). The
        # backbone has one spare position after the context, ``scratch``, where a graph warms up.
        self.scratch = max_seq_len
        self.backbone = DecoderStack(backbone.layers, backbone.norm, backbone.rotary_emb, cfg, max_seq_len + 1)
        dcfg = model.depth_decoder.config
        self.depth = DecoderStack(depth.layers, depth.norm, depth.rotary_emb, dcfg, self.num_codebooks + 1)
        # Step 2: embeddings and heads.
        self.text_embed = model.embed_text_tokens.weight.detach()  # (text vocab, H)
        self.audio_embed = backbone.embed_tokens.embed_audio_tokens.weight.detach()  # (K * V, H)
        self.audio_offsets = backbone.embed_tokens.audio_tokens_offsets.detach()  # (K,)
        self.depth_embed = depth.embed_tokens.weight.detach()  # (K * V, H), tied to audio_embed
        self.projector = depth.inputs_embeds_projector.weight.detach()  # (Hd, H)
        self.lm_head = model.lm_head.weight.detach()  # (V, H)
        self.heads = model.depth_decoder.codebooks_head.weight.detach()  # (K - 1, Hd, V)
        self.device = self.lm_head.device
        # Step 3: what the backbone cache holds: the first ``length`` of `(max_seq_len, K + 1)` rows.
        self._rows = torch.full(
            (max_seq_len, self.num_codebooks + 1), NO_TOKEN, dtype=torch.long, device=self.device
        )
        self.length = 0
        self.chunk = PREFILL_CHUNK
        # Codes Mimi can decode (the sampler never picks others).
        codec_size = int(model.codec_model.config.codebook_size)
        self.decodable_codes = codec_size if codec_size < self.vocab else None

    @property
    def rows(self) -> torch.Tensor:
        """`(length, K + 1)` the rows whose keys and values the backbone cache holds."""
        return self._rows[: self.length]

    def reset(self) -> None:
        """Forget the cached prefix (the next prefill starts from position 0)."""
        self.length = 0

    # ---- prompt ---------------------------------------------------------------------------------

    def reusable_prefix(self, rows: torch.Tensor) -> int:
        """How many leading positions of `(P, K + 1)` ``rows`` (on the model's device) the cache already
        holds: at most P - 1, since the last position's hidden state is needed to start generating."""
        return min(common_prefix(self.rows, rows), len(rows) - 1)

    @torch.no_grad()
    def prefill(
        self, rows: torch.Tensor, cancel: threading.Event | None = None
    ) -> tuple[torch.Tensor | None, int]:
        """Prefill `(P, K + 1)` prompt rows after the reusable prefix, chunk by chunk.

        Returns the last position's normed hidden state `(1, 1, H)` (None when ``cancel`` stopped it)
        and the number of positions prefilled.
        """
        rows = rows.to(self.device)
        start = self.reusable_prefix(rows)
        # Step 1: forget the cached rows this prompt does not share (their keys/values get overwritten).
        self.length = start
        stop = cancel.is_set if cancel is not None else None
        hidden = None
        for begin in range(start, len(rows), self.chunk):
            end = min(begin + self.chunk, len(rows))
            # Step 2: one chunk through the backbone (cancel is checked before each layer).
            try:
                hidden = self.backbone.forward(self.embed_rows(rows[begin:end]), begin, stop)
            except Stopped:
                return None, begin - start
            # Step 3: its keys and values are complete in every layer: only now record them.
            self._rows[begin:end] = rows[begin:end]
            self.length = end
        assert hidden is not None  # at least the last position is always prefilled
        return hidden[:, -1:], len(rows) - start

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """`(n, K + 1)` rows -> `(1, n, H)` input embeddings (text: the text table; audio: summed codebooks)."""
        is_text = rows[:, 0] != NO_TOKEN
        out = torch.empty(
            len(rows), self.text_embed.shape[1], dtype=self.text_embed.dtype, device=self.device
        )
        if is_text.any():
            out[is_text] = F.embedding(rows[is_text, 0], self.text_embed)
        if (~is_text).any():
            out[~is_text] = self.embed_frames(rows[~is_text, 1:])[0]
        return out[None]

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """`(n, K)` codes -> `(1, n, H)`: each codebook's embedding, summed in one call as the model does."""
        return F.embedding(frames[None] + self.audio_offsets, self.audio_embed).sum(dim=2)

    # ---- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def frames(
        self,
        hidden: torch.Tensor,
        sampler: Sampler,
        max_frames: int,
        cancel: threading.Event | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield frames `(K,)` int64 (on the model's device) until the all-zero end frame (not yielded),
        ``max_frames`` or ``cancel``. ``hidden`` is the `(1, 1, H)` state after the prompt.
        (``no_grad`` on a generator applies around each resumption, i.e. once per frame.)"""
        for count in range(max_frames):
            if cancel is not None and cancel.is_set():
                return
            # Step 1: backbone head -> codebook 0; depth decoder -> codebooks 1..K-1.
            sampler.begin_frame()
            frame = self.depth_frame(hidden, sampler)
            # Step 2: the end frame stops the segment (it is never fed back); the one sync per frame.
            if not bool(frame.any()):
                return
            # Step 3: feed the frame back, unless the cap is reached.
            if count + 1 < max_frames:
                hidden = self.feed(frame)
            yield frame

    def depth_frame(self, hidden: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """`(1, 1, H)` backbone hidden state -> one frame `(K,)` int64."""
        codes = torch.empty(self.num_codebooks, dtype=torch.long, device=self.device)
        c0 = sampler(F.linear(hidden[:, -1], self.lm_head))  # (1,)
        codes[0] = c0[0]
        # First depth step: ONE call over [backbone hidden, embed(c0)], projected to the depth width.
        x = torch.cat([hidden, F.embedding(c0[None], self.depth_embed)], dim=1)  # (1, 2, H)
        h = self.depth.forward(F.linear(x, self.projector), 0)
        for i in range(1, self.num_codebooks):
            # Codebook i comes from position i with head i - 1.
            ci = sampler(F.linear(h[:, -1], self.heads[i - 1].T))
            codes[i] = ci[0]
            if i + 1 < self.num_codebooks:
                # Feed codebook i (its own slice of the embedding table) at position i + 1.
                e = F.embedding(ci[None] + i * self.vocab, self.depth_embed)
                h = self.depth.forward(F.linear(e, self.projector), i + 1)
        return codes

    def feed(self, frame: torch.Tensor) -> torch.Tensor:
        """Feed one generated frame `(K,)` at the next backbone position; return its hidden `(1, 1, H)`."""
        hidden = self.backbone.forward(self.embed_frames(frame[None]), self.length)
        self.record_frame(frame)
        return hidden

    def record_frame(self, frame: torch.Tensor) -> None:
        """Note that the cache now holds `(K,)` ``frame`` at the next position."""
        self._rows[self.length, 1:] = frame
        self._rows[self.length, 0] = NO_TOKEN
        self.length += 1
