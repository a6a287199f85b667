"""The hardware floor of CSM generation at batch 1: weight bytes read per frame / weight-streaming bandwidth.

At batch 1 every generated frame reads the weights it uses once per pass, and matrix-vector products are
bound by memory bandwidth, so ``weight_bytes_per_frame / bandwidth`` is the time no implementation on
this device can beat (compute, attention over the KV cache and sampling come on top).

How bytes are counted (``weight_bytes_per_frame``):
- the backbone's decoder layers and final norm, once (one backbone step per frame);
- ``lm_head`` (the codebook-0 head), once;
- the depth decoder's layers, final norm and input projection (backbone width -> depth width),
  ``K - 1`` times: it runs K - 1 passes per frame (the first over two positions, then one per codebook);
- the depth decoder's codebook heads ``(K - 1, H_depth, V)``: each pass uses one head, so all of them once.
Embedding tables are not counted: a frame gathers only K rows from them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

# Bandwidth probe: matrices of the backbone MLP's shape, this many bytes in all (several times the
# largest last-level caches seen: 260 MiB L3 on the dev CPU, 50 MiB L2 on an H100).
PROBE_BYTES = 1 << 30
PROBE_SHAPE = (8192, 2048)


def _bytes(module_or_tensor: Any) -> int:
    """Bytes of a tensor, or of all parameters of a module."""
    if isinstance(module_or_tensor, torch.Tensor):
        return module_or_tensor.numel() * module_or_tensor.element_size()
    return sum(p.numel() * p.element_size() for p in module_or_tensor.parameters())


def weight_bytes_per_frame(model: Any) -> dict[str, int]:
    """Bytes of weights read per generated frame by a ``CsmForConditionalGeneration``, by part, and ``total``."""
    k = int(model.config.num_codebooks)
    backbone = model.backbone_model
    depth = model.depth_decoder.model
    parts = {
        "backbone": sum(_bytes(layer) for layer in backbone.layers) + _bytes(backbone.norm),
        "lm_head": _bytes(model.lm_head.weight),
        "depth_decoder": (k - 1)
        * (sum(_bytes(layer) for layer in depth.layers) + _bytes(depth.norm) + _bytes(depth.inputs_embeds_projector)),
        "codebook_heads": _bytes(model.depth_decoder.codebooks_head.weight),
    }
    parts["total"] = sum(parts.values())
    return parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def measure_bandwidth(
    device: torch.device, dtype: torch.dtype, total_bytes: int = PROBE_BYTES, repeats: int = 5
) -> float:
    """Weight-streaming bandwidth in GB/s (1e9 bytes/s): ``F.linear`` of one vector over matrices of
    ``total_bytes`` in all, in ``dtype`` on ``device``; the best of ``repeats`` passes after a warm-up."""
    rows, cols = PROBE_SHAPE
    per = rows * cols * torch.tensor([], dtype=dtype).element_size()
    count = max(1, total_bytes // per)
    # Step 1: the matrices (non-zero, so no backend can skip them; constant, so they build fast).
    mats = [torch.full((rows, cols), 0.01 * (i + 1), device=device, dtype=dtype) for i in range(count)]
    x = torch.full((1, cols), 0.5, device=device, dtype=dtype)
    # Step 2: time passes over every matrix; the first pass warms up.
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for w in mats:
            F.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return count * per / best / 1e9
