"""Memory a model with a context of ``max_seq_len`` positions needs, estimated before it loads.

The estimate reads only the checkpoint's ``config.json`` and its safetensors headers (a local folder
or the hub cache; no download, no weights); without them it uses CSM-1B's sizes. It counts:

- weights: every parameter in the dtype the model runs in (Mimi always in float32);
- per context position: the backbone's key/value cache (layers x 2 x kv_heads x head_dim x dtype
  bytes), its RoPE tables, and the engine's per-position bookkeeping (the prompt rows it keeps and
  views into the RoPE tables);
- attention working memory of a prefill: heads x ``PREFILL_CHUNK`` x max_seq_len float32 scores
  (a prefill attends ``PREFILL_CHUNK`` positions at once against the whole context, at most).

The depth decoder's cache holds K + 1 positions whatever ``max_seq_len`` is (counted, but small).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CSM-1B (transformers' CsmConfig defaults are its sizes): used when the checkpoint cannot be read.
CSM_1B: dict[str, Any] = {
    "num_hidden_layers": 16, "num_key_value_heads": 8, "num_attention_heads": 32, "hidden_size": 2048,
    "head_dim": 64, "num_codebooks": 32,
    "depth_decoder_config": {"num_hidden_layers": 4, "num_key_value_heads": 2, "num_attention_heads": 8,
                             "hidden_size": 1024, "head_dim": 128},
}  # fmt: skip
CSM_1B_PARAMS = 1_632_100_161  # all of it, Mimi (79.3 M) included
MIMI_PARAMS = 79_308_609
PER_POSITION_OVERHEAD = 1536  # bytes: the engine's per-position views into its RoPE tables (measured ~600 B each)
PREFILL_CHUNK = 256  # positions a prefill attends at once (frames.py prefills in chunks of this size)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    per_position: int  # bytes the context needs per position
    fixed: int  # bytes the context needs whatever its length (the depth decoder's cache)
    max_seq_len: int
    source: str  # where the sizes came from
    streams: int = 1  # streams generated at once: each has its own context caches

    @property
    def context(self) -> int:
        return (self.per_position * self.max_seq_len + self.fixed) * self.streams

    @property
    def total(self) -> int:
        return self.weights + self.context

    def longest_fitting(self, available: int) -> int:
        """The most positions per stream that fit ``available`` bytes beside the weights (0 if none)."""
        return max(0, ((available - self.weights) // self.streams - self.fixed) // self.per_position)


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def context_cost(config: dict[str, Any], dtype_bytes: int) -> tuple[int, int]:
    """Bytes per context position and fixed bytes the engine allocates (see the module doc); the
    prefill's scores are counted as ``PREFILL_CHUNK`` rows per position (an upper bound)."""
    k = int(config.get("num_codebooks", 32))
    head_dim = _head_dim(config)
    kv = int(config["num_hidden_layers"]) * 2 * int(config["num_key_value_heads"]) * head_dim * dtype_bytes
    scores = int(config["num_attention_heads"]) * PREFILL_CHUNK * 4
    per_position = kv + 2 * head_dim * dtype_bytes + (k + 1) * 8 + 8 + PER_POSITION_OVERHEAD + scores
    depth = config.get("depth_decoder_config") or CSM_1B["depth_decoder_config"]
    depth_kv = int(depth["num_hidden_layers"]) * 2 * int(depth["num_key_value_heads"]) * _head_dim(depth) * dtype_bytes
    return per_position, depth_kv * (k + 1)


def safetensors_params(folder: Path) -> int | None:
    """Parameters in the folder's ``*.safetensors`` files, from their headers only (None if none)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= int(dim)
                total += count
    return total


def checkpoint_folder(model_id: str, revision: str | None = None) -> Path | None:
    """The local folder holding ``model_id``'s config.json (a folder, or the hub cache), else None."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local if (local / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except (ValueError, OSError):  # not a valid repo id, or an unreadable cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def estimate(
    model_id: str, revision: str | None, max_seq_len: int, dtype_bytes: int, streams: int = 1
) -> MemoryEstimate:
    """Weights + context bytes for ``model_id`` run with ``dtype_bytes`` per value (Mimi in float32),
    generating ``streams`` streams at once (each with its own caches)."""
    folder = checkpoint_folder(model_id, revision)
    config, params, source = CSM_1B, CSM_1B_PARAMS, "CSM-1B sizes"
    if folder is not None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            _head_dim(config), int(config["num_hidden_layers"]), int(config["num_key_value_heads"])
            params, source = safetensors_params(folder) or CSM_1B_PARAMS, f"{folder / 'config.json'}"
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            config, params, source = CSM_1B, CSM_1B_PARAMS, "CSM-1B sizes (the checkpoint's config is unreadable)"
    mimi = min(MIMI_PARAMS, params // 20)
    weights = (params - mimi) * dtype_bytes + mimi * 4
    per_position, fixed = context_cost(config, dtype_bytes)
    return MemoryEstimate(weights, per_position, fixed, max_seq_len, source, streams)


def available_memory(device: str) -> tuple[int, str]:
    """Bytes free for the model on ``device`` ("cuda", "mps" or "cpu") and what was measured."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free), "free GPU memory"
    import psutil

    # Free swap counts: a run that pages is slow but works; one that needs more than both cannot.
    return int(psutil.virtual_memory().available + psutil.swap_memory().free), "available memory (with swap)"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fits(est: MemoryEstimate, available: int) -> bool:
    return est.total <= available


def too_big_message(est: MemoryEstimate, available: int, what: str) -> str:
    """One line: what does not fit and how to fix it."""
    suggest = est.longest_fitting(available) // 256 * 256
    fix = f"lower context.max_seq_len in config.yaml (at most about {suggest} here)" if suggest >= 64 else (
        "free memory or use a smaller dtype (--dtype bfloat16)")
    if est.streams > 1:
        fix += " or engine.max_batch"
    what_for = f" for {est.streams} streams at once" if est.streams > 1 else ""
    return (
        f"context.max_seq_len {est.max_seq_len}{what_for} needs about {gib(est.total)} (weights {gib(est.weights)} + "
        f"context {gib(est.context)}) but only {gib(available)} of {what} is there: {fix}"
    )
