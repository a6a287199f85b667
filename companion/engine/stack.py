"""A Llama-style decoder stack (CSM's backbone or depth decoder) run from its weights with a static KV cache.

The arithmetic follows transformers' CSM modules operation for operation so the results are
bit-identical (see docs/engine.md): the model's own RMSNorm formula, ``x + f(x)`` residuals, RoPE
tables from the model's own rotary embedding, and attention over the live prefix of the cache only
(keys and values sliced to the current length, no mask for one query; for several queries after
cached positions the lower-right causal bias, which SDPA's fused kernels accept, never a dense mask).

Two fusions cut the number of kernel launches per layer without changing a single bit: q/k/v are one
matrix product and gate/up are one (each output element is the same dot product either way; the
exactness tests check it). The fused matrices are built once and the model's own ``q_proj``/``k_proj``/
``v_proj``/``gate_proj``/``up_proj`` weights are re-pointed to row views of them, so no weight is held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


class Stopped(Exception):
    """``forward``'s ``stop()`` said to stop: the call wrote some keys/values but finished nothing."""


@dataclass
class LayerWeights:
    """The tensors of one ``CsmDecoderLayer`` (q/k/v and gate/up fused)."""

    ln_attn: torch.Tensor  # (H,)
    w_qkv: torch.Tensor  # ((Hq + 2 Hkv) * D, H)
    wo: torch.Tensor  # (H, Hq * D)
    ln_mlp: torch.Tensor  # (H,)
    w_gate_up: torch.Tensor  # (2 I, H)
    w_down: torch.Tensor  # (H, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CsmRMSNorm's formula (in float32, back to the input dtype, then scaled), not ``F.rms_norm``."""
    wide = x.dtype != torch.float32  # the casts are no-ops in float32: skip their call overhead
    h = x.float() if wide else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h.to(x.dtype) if wide else h)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderStack:
    """Runs ``layers`` + final ``norm`` of a CSM transformer on `(B, n, H)` inputs at positions
    ``start .. start + n - 1``, keeping keys and values in caches `(rows, Hkv, max_len, D)` per layer:
    one cache row per stream (a slot; row 0 when there is one stream)."""

    def __init__(self, layers: Any, norm: Any, rotary: Any, config: Any, max_len: int, rows: int) -> None:
        first = layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.eps = norm.variance_epsilon
        self.norm = norm.weight.detach()
        self.layers = [fuse_layer(layer) for layer in layers]
        weight = self.norm
        # Step 1: static caches, one pair per layer, one row per slot.
        shape = (rows, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        # Step 2: RoPE tables `(max_len, D)` from the model's own rotary embedding (same float math),
        # and per-position `(1, 1, 1, D)` views for one-token steps.
        positions = torch.arange(max_len, device=weight.device)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=weight.dtype, device=weight.device), positions)
        self.cos, self.sin = cos[0], sin[0]
        self.cos_at = [self.cos[p : p + 1][None, None] for p in range(max_len)]
        self.sin_at = [self.sin[p : p + 1][None, None] for p in range(max_len)]
        self._positions = positions[0]  # (max_len,) for the static-shape step's mask
        self._rows = torch.arange(rows, device=weight.device)  # (rows,) for its cache writes

    def forward(
        self, x: torch.Tensor, start: int, stop: Callable[[], bool] | None = None, row: int = 0
    ) -> torch.Tensor:
        """`(B, n, H)` inputs at positions ``start..start+n-1`` -> `(B, n, H)` normed hidden states, with
        the cache rows ``row .. row + B - 1`` (every row at the same positions).

        ``stop`` is asked before every layer; when it says yes, ``Stopped`` is raised (the keys and values
        of the earlier layers at these positions are then written but incomplete)."""
        n = x.shape[1]
        if n == 1:
            cos, sin = self.cos_at[start], self.sin_at[start]
        else:
            cos, sin = self.cos[start : start + n][None, None], self.sin[start : start + n][None, None]
        # Several queries after cached keys: query j sees keys 0..start + j (causal, aligned lower right).
        mask = causal_lower_right(n, start + n) if n > 1 and start > 0 else None
        for i, w in enumerate(self.layers):
            if stop is not None and stop():
                raise Stopped
            # Attention block: norm, q/k/v, RoPE, write the cache, attend over the live prefix, residual.
            h = rms_norm(x, w.ln_attn, self.eps)
            x = x + F.linear(self._attend(i, w, h, cos, sin, start, mask, row), w.wo)
            # MLP block: norm, SiLU-gated MLP, residual.
            h = rms_norm(x, w.ln_mlp, self.eps)
            gate, up = F.linear(h, w.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.w_down)
        return rms_norm(x, self.norm, self.eps)

    def step(self, x: torch.Tensor, starts: list[int | None]) -> torch.Tensor:
        """`(B, 1, H)` inputs, row ``b`` at position ``starts[b]`` of cache row ``b`` -> `(B, 1, H)`.

        A row whose start is None is padding: nothing of it is written to the cache and its output is
        meaningless. Each real row attends over its own live prefix, exactly as ``forward`` does for one
        row; the products over the rows are one call (the weights are read once for every stream)."""
        live = [(b, p) for b, p in enumerate(starts) if p is not None]
        at = [p if p is not None else 0 for p in starts]
        index = torch.tensor(at, device=x.device)
        cos = self.cos.index_select(0, index)[:, None, None]  # (B, 1, 1, D)
        sin = self.sin.index_select(0, index)[:, None, None]
        B = x.shape[0]
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.ln_attn, self.eps)
            qkv = F.linear(h, w.w_qkv).view(B, 1, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            qk = qkv[:, : self.heads + self.kv_heads]
            qk = (qk * cos) + (rotate_half(qk) * sin)
            out = torch.zeros(B, 1, self.heads * self.head_dim, dtype=x.dtype, device=x.device)
            for b, p in live:
                keys, values = self.keys[i][b : b + 1], self.values[i][b : b + 1]
                keys.narrow(2, p, 1).copy_(qk[b : b + 1, self.heads :])
                values.narrow(2, p, 1).copy_(qkv[b : b + 1, self.heads + self.kv_heads :])
                o = F.scaled_dot_product_attention(
                    qk[b : b + 1, : self.heads], keys.narrow(2, 0, p + 1), values.narrow(2, 0, p + 1),
                    scale=self.scaling, enable_gqa=self.kv_heads != self.heads,
                )  # fmt: skip
                out[b] = o.transpose(1, 2).reshape(1, self.heads * self.head_dim)
            x = x + F.linear(out, w.wo)
            h = rms_norm(x, w.ln_mlp, self.eps)
            gate, up = F.linear(h, w.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.w_down)
        return rms_norm(x, self.norm, self.eps)

    def _attend(
        self,
        i: int,
        w: LayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: CausalBias | None,
        row: int,
    ) -> torch.Tensor:
        """`(B, n, H)` normed input -> `(B, n, Hq * D)` attention output (before o_proj)."""
        B, n = h.shape[0], h.shape[1]
        # q, k, v in one product: `(B, Hq + 2 Hkv, n, D)`; RoPE on the q and k heads together.
        qkv = F.linear(h, w.w_qkv).view(B, n, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        qk = qkv[:, : self.heads + self.kv_heads]
        qk = (qk * cos) + (rotate_half(qk) * sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        keys, values = self.keys[i], self.values[i]
        if row != 0 or B != keys.shape[0]:
            keys, values = keys[row : row + B], values[row : row + B]
        keys.narrow(2, start, n).copy_(k)
        values.narrow(2, start, n).copy_(qkv[:, self.heads + self.kv_heads :])
        out = F.scaled_dot_product_attention(
            q,
            keys.narrow(2, 0, start + n),
            values.narrow(2, 0, start + n),
            attn_mask=mask,
            is_causal=n > 1 and mask is None,
            scale=self.scaling,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out.transpose(1, 2).reshape(B, n, self.heads * self.head_dim)

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Static-shape step for CUDA graphs: `(B, 1, H)` inputs, row ``b`` at the position held in
        ``pos[b]`` (a `(B,)` int64 tensor) of cache row ``b`` -> `(B, 1, H)`. Attends over the whole cache
        with a position mask (shapes never change, so one capture serves every position; bits may differ
        from ``forward``)."""
        B = x.shape[0]
        cos = self.cos.index_select(0, pos).view(B, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(B, 1, 1, -1)
        visible = (self._positions[None] <= pos[:, None]).view(B, 1, 1, -1)  # (B, 1, 1, max_len)
        rows, at = self._rows[:B, None], pos[:, None]  # cache row b, position pos[b]
        groups = self.heads // self.kv_heads
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.ln_attn, self.eps)
            qkv = (
                F.linear(h, w.w_qkv).view(B, 1, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            )
            qk = qkv[:, : self.heads + self.kv_heads]
            qk = (qk * cos) + (rotate_half(qk) * sin)
            keys, values = self.keys[i][:B], self.values[i][:B]
            keys[rows, :, at] = qk[:, self.heads :].transpose(1, 2)  # (B, 1, Hkv, D) into row b at pos[b]
            values[rows, :, at] = qkv[:, self.heads + self.kv_heads :].transpose(1, 2)
            # One query: its heads of a group become rows of that group's query (no GQA kernel needed).
            q = qk[:, : self.heads].reshape(B, self.kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=self.scaling)
            x = x + F.linear(out.reshape(B, 1, self.heads * self.head_dim), w.wo)
            h = rms_norm(x, w.ln_mlp, self.eps)
            gate, up = F.linear(h, w.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.w_down)
        return rms_norm(x, self.norm, self.eps)


def fuse_layer(layer: Any) -> LayerWeights:
    """The layer's weights with q/k/v and gate/up fused; the modules' weights become views of the fused ones."""
    attn, mlp = layer.self_attn, layer.mlp
    if attn.q_proj.bias is not None or mlp.gate_proj.bias is not None:
        raise ValueError("CSM layers with biases are not supported (csm-1b has none)")
    return LayerWeights(
        ln_attn=layer.input_layernorm.weight.detach(),
        w_qkv=_fuse_rows(attn, ["q_proj", "k_proj", "v_proj"]),
        wo=attn.o_proj.weight.detach(),
        ln_mlp=layer.post_attention_layernorm.weight.detach(),
        w_gate_up=_fuse_rows(mlp, ["gate_proj", "up_proj"]),
        w_down=mlp.down_proj.weight.detach(),
    )


FUSED_ATTR = "_companion_fused"  # where the fused matrix is kept on the module (one per module)


def _fuse_rows(module: Any, names: list[str]) -> torch.Tensor:
    """Stack the ``names`` linears' `(out_i, in)` weights into one `(sum out_i, in)` matrix and point
    the linears at row views of it. Done once per module: later engines on the same model reuse it."""
    fused = getattr(module, FUSED_ATTR, None)
    linears = [getattr(module, name) for name in names]
    if fused is not None and _views_of(fused, [lin.weight for lin in linears]):
        return fused
    fused = torch.cat([lin.weight.detach() for lin in linears])
    row = 0
    with torch.no_grad():
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = fused[row : row + rows]
            row += rows
    setattr(module, FUSED_ATTR, fused)
    return fused


def _views_of(fused: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether ``weights`` are still the consecutive row blocks of ``fused``."""
    row = 0
    for w in weights:
        if row >= fused.shape[0] or w.data_ptr() != fused[row].data_ptr():
            return False
        row += w.shape[0]
    return row == fused.shape[0]
