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
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from companion.engine.memory import PREFILL_CHUNK  # positions per prefill forward
from companion.engine.prompt import NO_TOKEN, common_prefix
from companion.engine.sampling import Sampler
from companion.engine.stack import DecoderStack, Stopped


class FrameLoop:
    """Owns the backbone and depth-decoder caches of one model and generates frames.

    The backbone cache has ``slots`` rows (one per stream generated at once); each slot keeps its own
    record of the rows it holds (its prefix). ``length``, ``rows``, ``prefill`` and ``frames`` without a
    slot mean slot 0 (the one slot of a single-stream engine)."""

    def __init__(self, model: Any, max_seq_len: int, slots: int) -> None:
        cfg = model.config
        self.model = model
        self.num_codebooks = cfg.num_codebooks
        self.vocab = cfg.vocab_size
        self.slots = slots
        backbone, depth = model.backbone_model, model.depth_decoder.model
        # Step 1: the two transformers with static caches (the depth decoder needs K + 1 positions). The
        # backbone has one spare position after the context, ``scratch``, where a graph warms up.
        self.scratch = max_seq_len
        self.backbone = DecoderStack(
            backbone.layers, backbone.norm, backbone.rotary_emb, cfg, max_seq_len + 1, rows=slots
        )
        dcfg = model.depth_decoder.config
        self.depth = DecoderStack(
            depth.layers, depth.norm, depth.rotary_emb, dcfg, self.num_codebooks + 1, rows=slots
        )
        # Step 2: embeddings and heads.
        self.text_embed = model.embed_text_tokens.weight.detach()  # (text vocab, H)
        self.audio_embed = backbone.embed_tokens.embed_audio_tokens.weight.detach()  # (K * V, H)
        self.audio_offsets = backbone.embed_tokens.audio_tokens_offsets.detach()  # (K,)
        self.depth_embed = depth.embed_tokens.weight.detach()  # (K * V, H), tied to audio_embed
        self.projector = depth.inputs_embeds_projector.weight.detach()  # (Hd, H)
        self.lm_head = model.lm_head.weight.detach()  # (V, H)
        self.heads = model.depth_decoder.codebooks_head.weight.detach()  # (K - 1, Hd, V)
        self.device = self.lm_head.device
        # Step 3: what each slot's backbone cache holds: the first ``lengths[s]`` of its rows.
        self._rows = torch.full(
            (slots, max_seq_len, self.num_codebooks + 1), NO_TOKEN, dtype=torch.long, device=self.device
        )
        self.lengths = [0] * slots
        self.chunk = PREFILL_CHUNK
        # Codes Mimi can decode (the sampler never picks others).
        codec_size = int(model.codec_model.config.codebook_size)
        self.decodable_codes = codec_size if codec_size < self.vocab else None

    def twin(self) -> FrameLoop:
        """A loop on the same weights with caches of its own, of the same shapes: what a frame compiles on
        beside generation (it writes only its own caches)."""
        return FrameLoop(self.model, self.scratch, self.slots)

    @property
    def length(self) -> int:
        """Positions slot 0 holds."""
        return self.lengths[0]

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    @property
    def rows(self) -> torch.Tensor:
        """`(length, K + 1)` the rows whose keys and values slot 0's cache holds."""
        return self.rows_of(0)

    def rows_of(self, slot: int) -> torch.Tensor:
        """`(lengths[slot], K + 1)` the rows whose keys and values ``slot``'s cache holds."""
        return self._rows[slot, : self.lengths[slot]]

    def reset(self) -> None:
        """Forget every cached prefix (the next prefill starts from position 0)."""
        self.lengths = [0] * self.slots

    # ---- prompt ---------------------------------------------------------------------------------

    def reusable_prefix(self, rows: torch.Tensor, slot: int) -> int:
        """How many leading positions of `(P, K + 1)` ``rows`` (on the model's device) ``slot``'s cache
        already holds: at most P - 1, since the last position's hidden state is needed to start generating."""
        return min(common_prefix(self.rows_of(slot), rows), len(rows) - 1)

    @torch.no_grad()
    def prefill(
        self, rows: torch.Tensor, cancel: threading.Event | None = None, slot: int = 0
    ) -> tuple[torch.Tensor | None, int]:
        """Prefill `(P, K + 1)` prompt rows after the reusable prefix, chunk by chunk.

        Returns the last position's normed hidden state `(1, 1, H)` (None when ``cancel`` stopped it)
        and the number of positions prefilled.
        """
        rows = rows.to(self.device)
        start = self.begin_prefill(rows, slot)
        stop = cancel.is_set if cancel is not None else None
        while True:
            begin = self.lengths[slot]
            try:
                hidden = self.prefill_chunk(rows, slot, stop)
            except Stopped:
                return None, begin - start
            if hidden is not None:
                return hidden, len(rows) - start

    def begin_prefill(self, rows: torch.Tensor, slot: int) -> int:
        """Forget ``slot``'s cached rows that `(P, K + 1)` ``rows`` does not share (their keys/values get
        overwritten); return where the prefill starts."""
        start = self.reusable_prefix(rows, slot)
        self.lengths[slot] = start
        return start

    @torch.no_grad()
    def prefill_chunk(
        self, rows: torch.Tensor, slot: int, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Prefill the next chunk of ``rows`` after what ``slot`` holds (after ``begin_prefill``); return the
        last position's hidden state `(1, 1, H)` once the whole prompt is in, else None. Raises Stopped
        (cancel is checked before each layer); the chunk's rows are recorded only once it is complete."""
        begin = self.lengths[slot]
        end = min(begin + self.chunk, len(rows))
        hidden = self.backbone.forward(self.embed_rows(rows[begin:end]), begin, stop, row=slot)
        # Its keys and values are complete in every layer: only now record them.
        self._rows[slot, begin:end] = rows[begin:end]
        self.lengths[slot] = end
        return hidden[:, -1:] if end == len(rows) else None

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

    def embed_frame_rows(self, frames: torch.Tensor) -> torch.Tensor:
        """`(B, K)` codes, one frame per stream -> `(B, 1, H)` (``embed_frames`` of each row)."""
        return F.embedding(frames[:, None] + self.audio_offsets, self.audio_embed).sum(dim=2)

    # ---- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def frames(
        self,
        hidden: torch.Tensor,
        sampler: Sampler,
        max_frames: int,
        cancel: threading.Event | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield slot 0's frames `(K,)` int64 (on the model's device) until the all-zero end frame (not
        yielded), ``max_frames`` or ``cancel``. ``hidden`` is the `(1, 1, H)` state after the prompt.
        (``no_grad`` on a generator applies around each resumption, i.e. once per frame.)"""
        for count in range(max_frames):
            if cancel is not None and cancel.is_set():
                return
            # Step 1: backbone head -> codebook 0; depth decoder -> codebooks 1..K-1.
            sampler.begin_frame()
            frame = self.depth_frame(hidden, sampler)[0]
            # Step 2: the end frame stops the segment (it is never fed back); the one sync per frame.
            if not bool(frame.any()):
                return
            # Step 3: feed the frame back, unless the cap is reached.
            if count + 1 < max_frames:
                hidden = self.feed(frame)
            yield frame

    def depth_frame(self, hidden: torch.Tensor, sampler: RowSampler) -> torch.Tensor:
        """`(B, 1, H)` backbone hidden states -> one frame per row `(B, K)` int64 (``sampler`` maps
        `(B, V)` logits to `(B,)` codes)."""
        codes = torch.empty(hidden.shape[0], self.num_codebooks, dtype=torch.long, device=self.device)
        c0 = sampler(F.linear(hidden[:, -1], self.lm_head))  # (B,)
        codes[:, 0] = c0
        # First depth step: ONE call over [backbone hidden, embed(c0)], projected to the depth width.
        x = torch.cat([hidden, F.embedding(c0[:, None], self.depth_embed)], dim=1)  # (B, 2, H)
        h = self.depth.forward(F.linear(x, self.projector), 0)
        for i in range(1, self.num_codebooks):
            # Codebook i comes from position i with head i - 1.
            ci = sampler(F.linear(h[:, -1], self.heads[i - 1].T))
            codes[:, i] = ci
            if i + 1 < self.num_codebooks:
                # Feed codebook i (its own slice of the embedding table) at position i + 1.
                e = F.embedding(ci[:, None] + i * self.vocab, self.depth_embed)
                h = self.depth.forward(F.linear(e, self.projector), i + 1)
        return codes

    def feed(self, frame: torch.Tensor) -> torch.Tensor:
        """Feed one generated frame `(K,)` at slot 0's next position; return its hidden `(1, 1, H)`."""
        hidden = self.backbone.forward(self.embed_frames(frame[None]), self.length)
        self.record_frame(frame)
        return hidden

    def feed_rows(self, frames: torch.Tensor, fed: list[bool]) -> torch.Tensor:
        """Feed `(B, K)` frames, row ``b`` at slot ``b``'s next position where ``fed[b]``; return the
        hidden states `(B, 1, H)` (meaningless for the rows not fed). Records what was fed."""
        starts = [self.lengths[b] if f else None for b, f in enumerate(fed)]
        hidden = self.backbone.step(self.embed_frame_rows(frames), starts)
        for b, f in enumerate(fed):
            if f:
                self.record_frame(frames[b], b)
        return hidden

    def record_frame(self, frame: torch.Tensor, slot: int = 0) -> None:
        """Note that ``slot``'s cache now holds `(K,)` ``frame`` at its next position."""
        at = self.lengths[slot]
        self._rows[slot, at, 1:] = frame
        self._rows[slot, at, 0] = NO_TOKEN
        self.lengths[slot] = at + 1


class RowSampler(Protocol):
    """`(B, V)` logits -> `(B,)` codes, once per codebook of a frame (a ``Sampler`` is one for B = 1)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...
