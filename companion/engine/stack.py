"""A Llama-style decoder stack (CSM's backbone or depth decoder) run from its weights with a static KV cache.

The arithmetic follows transformers' CSM modules operation for operation so the results are
bit-identical (see docs/engine.md): the model's own RMSNorm formula, ``x + f(x)`` residuals, RoPE
tables from the model's own rotary embedding, and attention over the live prefix of the cache only
(keys and values sliced to the current length, no mask for one query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class LayerWeights:
    """The tensors of one ``CsmDecoderLayer``."""

    ln_attn: torch.Tensor  # (H,)
    wq: torch.Tensor  # (Hq * D, H)
    wk: torch.Tensor  # (Hkv * D, H)
    wv: torch.Tensor  # (Hkv * D, H)
    wo: torch.Tensor  # (H, Hq * D)
    ln_mlp: torch.Tensor  # (H,)
    w_gate: torch.Tensor  # (I, H)
    w_up: torch.Tensor  # (I, H)
    w_down: torch.Tensor  # (H, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CsmRMSNorm's formula (in float32, back to the input dtype, then scaled), not ``F.rms_norm``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderStack:
    """Runs ``layers`` + final ``norm`` of a CSM transformer on `(1, n, H)` inputs at positions
    ``start .. start + n - 1``, keeping keys and values in caches `(1, Hkv, max_len, D)` per layer."""

    def __init__(self, layers: Any, norm: Any, rotary: Any, config: Any, max_len: int) -> None:
        first = layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.eps = norm.variance_epsilon
        self.norm = norm.weight.detach()
        self.layers = [_layer_weights(layer) for layer in layers]
        weight = self.norm
        self.max_len = max_len
        # Step 1: static caches, one pair per layer.
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        # Step 2: RoPE tables `(max_len, D)` from the model's own rotary embedding (same float math).
        positions = torch.arange(max_len, device=weight.device)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=weight.dtype, device=weight.device), positions)
        self.cos, self.sin = cos[0], sin[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """`(1, n, H)` inputs at positions ``start..start+n-1`` -> `(1, n, H)` normed hidden states."""
        n = x.shape[1]
        cos = self.cos[start : start + n][None, None]
        sin = self.sin[start : start + n][None, None]
        mask = _causal_mask(n, start, x.device) if n > 1 and start > 0 else None
        for i, w in enumerate(self.layers):
            # Attention block: norm, q/k/v, RoPE, write the cache, attend over the live prefix, residual.
            h = rms_norm(x, w.ln_attn, self.eps)
            attn = self._attend(i, w, h, cos, sin, start, mask)
            x = x + F.linear(attn, w.wo)
            # MLP block: norm, SiLU-gated MLP, residual.
            h = rms_norm(x, w.ln_mlp, self.eps)
            x = x + F.linear(F.silu(F.linear(h, w.w_gate)) * F.linear(h, w.w_up), w.w_down)
        return rms_norm(x, self.norm, self.eps)

    def _attend(
        self,
        i: int,
        w: LayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(1, n, H)` normed input -> `(1, n, Hq * D)` attention output (before o_proj)."""
        n = h.shape[1]
        q = F.linear(h, w.wq).view(1, n, self.heads, self.head_dim).transpose(1, 2)
        k = F.linear(h, w.wk).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = F.linear(h, w.wv).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        end = start + n
        self.keys[i][:, :, start:end] = k
        self.values[i][:, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q,
            self.keys[i][:, :, :end],
            self.values[i][:, :, :end],
            attn_mask=mask,
            is_causal=n > 1 and mask is None,
            scale=self.scaling,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out.transpose(1, 2).reshape(1, n, self.heads * self.head_dim)


def _causal_mask(n: int, start: int, device: torch.device) -> torch.Tensor:
    """`(n, start + n)` bool: query ``start + i`` sees keys ``0..start + i``."""
    keys = torch.arange(start + n, device=device)
    return keys[None, :] <= (start + torch.arange(n, device=device))[:, None]


def _layer_weights(layer: Any) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn.q_proj, "bias", None) is not None or getattr(mlp.gate_proj, "bias", None) is not None:
        raise ValueError("CSM layers with biases are not supported (csm-1b has none)")
    return LayerWeights(
        ln_attn=layer.input_layernorm.weight.detach(),
        wq=attn.q_proj.weight.detach(),
        wk=attn.k_proj.weight.detach(),
        wv=attn.v_proj.weight.detach(),
        wo=attn.o_proj.weight.detach(),
        ln_mlp=layer.post_attention_layernorm.weight.detach(),
        w_gate=mlp.gate_proj.weight.detach(),
        w_up=mlp.up_proj.weight.detach(),
        w_down=mlp.down_proj.weight.detach(),
    )
