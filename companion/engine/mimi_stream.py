"""Streaming Mimi decode: frames in, the next audio samples out, equal to decoding the whole segment at once.

transformers' ``MimiModel.decode`` keeps no convolution state between calls, so decoding chunk by chunk
with it is wrong at every chunk boundary. This module runs the same weights step by step and carries
the state each layer needs between calls:

- dequantization is per frame (no state);
- the upsampling transposed convolution and the SEANet transposed convolutions keep the overlap
  (``kernel - stride`` output samples) that the next input adds into;
- every causal ``Conv1d`` keeps its last ``(kernel - 1) * dilation`` input samples (zeros at the start,
  as the whole-segment decode pads with zeros);
- the decoder transformer keeps its keys and values for the last ``sliding_window`` positions.

Mimi has no lookahead, so every frame's audio is final as soon as the frame is decoded.

It reads these transformers internals, all checked when a ``MimiStreamDecoder`` is built (by
``_decoder_parts``, ``_Transformer.__init__`` with ``_check_layer``, and the SEANet step classes), so an
upgrade that moves one fails at once with a one-line error instead of an AttributeError mid-turn:
``mimi.quantizer.decode``; ``mimi.decoder.upsample`` (``MimiConvTranspose1d``),
``mimi.decoder.decoder_transformer`` (``MimiTransformerModel``: ``layers``, ``rotary_emb``; each layer's
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``self_attn.scaling``, ``self_attn_layer_scale``,
``post_attention_layernorm``, ``mlp``, ``mlp_layer_scale``), the function
``modeling_mimi.apply_rotary_pos_emb``, ``mimi.decoder.decoder_seanet.layers`` (``MimiConv1d``,
``nn.ELU``, ``MimiConvTranspose1d``, ``MimiResnetBlock`` with ``block`` and ``shortcut``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import MimiModel
from transformers.models.mimi import modeling_mimi as mm

from companion.errors import CompanionError

SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 frames/s
# The transformers versions this module (and the engine) accept: pyproject.toml pins the same range.
TRANSFORMERS_RANGE = ">=5.24,<5.25"


class _Step(Protocol):
    def reset(self) -> None: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _unsupported(what: str) -> CompanionError:
    """The one-line error for a transformers version whose Mimi no longer looks as this module expects."""
    return CompanionError(
        f"streaming Mimi decode does not support this transformers version ({transformers.__version__}): {what}; "
        f"install a tested one: pip install 'transformers{TRANSFORMERS_RANGE}'"
    )


class _CausalConv:
    """A stride-1 causal ``MimiConv1d`` that keeps its left context between calls."""

    def __init__(self, layer: mm.MimiConv1d) -> None:
        conv = layer.conv
        if not layer.causal or conv.stride[0] != 1 or conv.padding[0] != 0 or layer.pad_mode != "constant":
            raise _unsupported("a decoder Conv1d is not causal, stride 1, zero padded")
        self.conv = conv
        self.context = (conv.kernel_size[0] - 1) * conv.dilation[0]  # input samples carried over
        self.state: torch.Tensor | None = None

    def reset(self) -> None:
        self.state = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`(1, C_in, n)` -> `(1, C_out, n)`."""
        if self.context == 0:
            return self.conv(x)
        # Prepend the carried context (zeros at the start of a segment), convolve, keep the new context.
        if self.state is None:
            self.state = x.new_zeros(x.shape[0], x.shape[1], self.context)
        padded = torch.cat([self.state, x], dim=2)
        self.state = padded[:, :, -self.context :]
        return self.conv(padded)


class _CausalConvTranspose:
    """A causal ``MimiConvTranspose1d`` (right trimmed) that keeps its overlap between calls.

    With ``kernel = m * stride`` the transposed convolution is one (grouped) matrix product giving m
    blocks of ``stride`` samples per input step, added at m successive output blocks.
    """

    def __init__(self, layer: mm.MimiConvTranspose1d) -> None:
        conv = layer.conv
        k, s = conv.kernel_size[0], conv.stride[0]
        if not layer.causal or layer.padding_left != 0 or layer.padding_right != k - s or conv.padding[0] != 0:
            raise _unsupported("a decoder ConvTranspose1d is not causal with the whole overhang trimmed right")
        if k % s != 0 or conv.dilation[0] != 1 or conv.output_padding[0] != 0:
            raise _unsupported("a decoder ConvTranspose1d has a kernel that is not a multiple of its stride")
        self.conv, self.stride, self.blocks = conv, s, k // s
        self.state: torch.Tensor | None = None  # (blocks - 1, C_out, stride) spilled past the emitted samples

    def reset(self) -> None:
        self.state = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`(1, C_in, n)` -> `(1, C_out, n*stride)`."""
        c, s, m, n = self.conv, self.stride, self.blocks, x.shape[2]
        g = c.groups
        c_in, c_out_g, k = c.weight.shape
        # Every input step times the kernel: (n, g, C_in/g) x (g, C_in/g, C_out/g * k) -> (n, C_out, m, s).
        if g == 1:  # one plain matrix product (faster than a batched one of batch 1)
            a = (x[0].t() @ c.weight.reshape(c_in, c_out_g * k)).view(n, c_out_g, m, s)
        else:
            w = c.weight.reshape(g, c_in // g, c_out_g * k)
            a = torch.einsum("ngi,gio->ngo", x[0].t().reshape(n, g, c_in // g), w).reshape(n, g * c_out_g, m, s)
        # Input step i writes kernel block j into output block i + j: (n + m - 1, C_out, s).
        y = a.new_zeros(n + m - 1, g * c_out_g, s)
        for j in range(m):
            y[j : j + n] += a[:, :, j]
        # Add what earlier inputs spilled into these blocks; keep what spills past them.
        if self.state is not None:
            y[: m - 1] += self.state
        self.state = y[n:]
        # Emit n blocks as (1, C_out, n*s), with the bias.
        out = y[:n].permute(1, 0, 2).reshape(1, g * c_out_g, n * s)
        return out + c.bias[None, :, None] if c.bias is not None else out


class _Elu:
    def __init__(self, layer: nn.ELU) -> None:
        self.layer = layer

    def reset(self) -> None:
        pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Resnet:
    """``MimiResnetBlock``: ``shortcut(x) + block(x)`` with streaming convolutions."""

    def __init__(self, layer: mm.MimiResnetBlock) -> None:
        self.block = [_seanet_step(m) for m in layer.block]
        sc = layer.shortcut
        self.shortcut: _Step | None = None if isinstance(sc, nn.Identity) else _seanet_step(sc)

    def reset(self) -> None:
        for step in self.block:
            step.reset()
        if self.shortcut is not None:
            self.shortcut.reset()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        for step in self.block:
            x = step(x)
        return residual + x


def _seanet_step(layer: nn.Module) -> _Step:
    """The streaming counterpart of one SEANet decoder layer."""
    if isinstance(layer, mm.MimiConv1d):
        return _CausalConv(layer)
    if isinstance(layer, mm.MimiConvTranspose1d):
        return _CausalConvTranspose(layer)
    if isinstance(layer, nn.ELU):
        return _Elu(layer)
    if isinstance(layer, mm.MimiResnetBlock):
        return _Resnet(layer)
    raise _unsupported(f"unexpected SEANet decoder layer {type(layer).__name__}")


class _Transformer:
    """Mimi's decoder transformer, run incrementally with its keys/values over the sliding window."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        names = ("sliding_window", "num_attention_heads", "num_key_value_heads", "head_dim")
        sizes = {n: getattr(cfg, n, None) for n in names}
        for name, value in sizes.items():
            if not isinstance(value, int):
                raise _unsupported(f"decoder transformer config has no integer {name}")
        if sizes["num_attention_heads"] != sizes["num_key_value_heads"]:
            raise _unsupported("decoder transformer uses grouped key/value heads")
        if not callable(getattr(model, "rotary_emb", None)) or not hasattr(model, "layers"):
            raise _unsupported("the decoder transformer has no rotary_emb or layers")
        if not callable(getattr(mm, "apply_rotary_pos_emb", None)):
            raise _unsupported("modeling_mimi has no apply_rotary_pos_emb")
        self.model: Any = model
        self.window, self.heads, self.head_dim = cfg.sliding_window, cfg.num_attention_heads, cfg.head_dim
        for layer in model.layers:
            _check_layer(layer)
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # absolute position of the next input step
        self.keys: list[torch.Tensor | None] = [None] * len(self.model.layers)
        self.values: list[torch.Tensor | None] = [None] * len(self.model.layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`(1, n, D)` -> `(1, n, D)` for the next n positions."""
        n = x.shape[1]
        # Rotary embeddings for the absolute positions of the new steps.
        pos = torch.arange(self.pos, self.pos + n, device=x.device)[None]
        cos, sin = self.model.rotary_emb(x, pos)
        for i, layer in enumerate(self.model.layers):
            # Pre-norm attention over the cached window plus the new steps, scaled residual.
            x = x + layer.self_attn_layer_scale(self._attend(i, layer.self_attn, layer.input_layernorm(x), cos, sin))
            # Pre-norm MLP, scaled residual.
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        self.pos += n
        return x

    def _attend(self, i: int, attn: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Self-attention of `(1, n, D)` new steps on the window; updates layer i's cache."""
        n = h.shape[1]
        # Project to (1, H, n, hd) queries, keys, values and rotate queries and keys.
        shape = (1, n, self.heads, self.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = mm.apply_rotary_pos_emb(q, k, cos, sin)
        # Append to the cache: (1, H, c + n, hd).
        past_k, past_v = self.keys[i], self.values[i]
        if past_k is not None and past_v is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # Query j (absolute pos0 + j) sees key at absolute p when pos0 + j - window < p <= pos0 + j.
        c = k.shape[2] - n
        qi = torch.arange(n, device=h.device)[:, None] + c
        ki = torch.arange(k.shape[2], device=h.device)[None, :]
        mask = (ki <= qi) & (ki > qi - self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        # Later queries need at most the last window - 1 keys.
        self.keys[i], self.values[i] = k[:, :, -(self.window - 1) :], v[:, :, -(self.window - 1) :]
        return attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))


def _check_layer(layer: nn.Module) -> None:
    """Fail loudly if a decoder transformer layer lacks what ``_Transformer`` uses."""
    names = ("input_layernorm", "self_attn", "self_attn_layer_scale", "post_attention_layernorm", "mlp", "mlp_layer_scale")
    missing = [n for n in names if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling") if not hasattr(layer.self_attn, n)]
    if missing:
        raise _unsupported(f"decoder transformer layer lacks {', '.join(missing)}")


def _decoder_parts(mimi: MimiModel) -> tuple[Any, Any, Any]:
    """(upsample, decoder_transformer, decoder_seanet), checked against what this module expects."""
    dec = getattr(mimi, "decoder", None)
    parts = [getattr(dec, n, None) for n in ("upsample", "decoder_transformer", "decoder_seanet")]
    kinds = (mm.MimiConvTranspose1d, mm.MimiTransformerModel, mm.MimiDecoder)
    if not all(isinstance(p, t) for p, t in zip(parts, kinds, strict=True)):
        raise _unsupported("MimiModel.decoder has no upsample/decoder_transformer/decoder_seanet")
    if not hasattr(mimi, "quantizer") or not hasattr(parts[2], "layers"):
        raise _unsupported("MimiModel has no quantizer or SEANet layers")
    return parts[0], parts[1], parts[2]


class MimiStreamDecoder:
    """Decode a segment's Mimi codes a few frames at a time.

    The concatenation of what ``decode`` returns over calls equals ``mimi.decode`` of the whole segment
    (to float rounding). Call ``reset()`` before each new segment.
    """

    def __init__(self, mimi: MimiModel) -> None:
        upsample, transformer, seanet = _decoder_parts(mimi)
        self.mimi = mimi
        self.upsample = _CausalConvTranspose(upsample)
        self.transformer = _Transformer(transformer)
        self.seanet = [_seanet_step(layer) for layer in seanet.layers]
        self.hop = SAMPLES_PER_FRAME

    def reset(self) -> None:
        """Start a new segment: forget every carried state."""
        self.upsample.reset()
        self.transformer.reset()
        for step in self.seanet:
            step.reset()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Decode the next frames of the segment.

        Args:
            codes: `(K, f)` int64, f >= 1 new frames.
        Returns:
            `(f*1920,)` float32: the next samples of the segment's audio.
        """
        if codes.dim() != 2 or codes.shape[1] < 1:
            raise ValueError(f"expected codes of shape (K, f) with f >= 1, got {tuple(codes.shape)}")
        # Dequantize: (1, K, f) -> latents (1, D, f).
        device = self.upsample.conv.weight.device
        latents = self.mimi.quantizer.decode(codes.to(device=device, dtype=torch.long)[None])
        latents = latents.to(self.upsample.conv.weight.dtype)
        # Upsample to the encoder frame rate: (1, D, 2f).
        h = self.upsample(latents)
        # Decoder transformer over the new steps: (1, 2f, D) -> (1, D, 2f).
        h = self.transformer(h.transpose(1, 2)).transpose(1, 2)
        # SEANet decoder to audio: (1, 1, f*1920).
        for step in self.seanet:
            h = step(h)
        return h[0, 0].float().cpu().numpy()
