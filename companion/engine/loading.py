"""Loading CSM through transformers' own classes, from a hub id or a local directory.

Every failure the user can fix becomes one ``ModelLoadError`` line: a gated repo (how to log in and
accept the terms, and the ungated copy), offline without a cached copy, missing or corrupt files,
not enough memory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from companion.engine.errors import ModelLoadError

UNGATED_COPY = "unsloth/csm-1b"
# The files a CSM checkpoint needs (weights are model.safetensors or sharded with an index).
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
# What `snapshot_download` fetches: everything the model and the processor read, nothing else.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def select_device(name: str = "auto") -> torch.device:
    """``auto``: cuda > mps > cpu; otherwise the named device, refused when it is not available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was asked for but no CUDA GPU is available: use --device cpu or auto"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(
            "device 'mps' was asked for but Metal is not available: use --device cpu or auto"
        )
    if name not in ("cuda", "mps", "cpu"):
        raise ModelLoadError(f"unknown device {name!r}: use auto, cuda, mps or cpu")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}: use auto, bfloat16, float16 or float32")
    return table[name]


def hub_error(
    err: BaseException, model: str, revision: str | None, downloading: bool = False
) -> ModelLoadError | None:
    """The one-line error for a hub failure, or None when ``err`` is not one we can explain.

    ``downloading``: the error comes from ``companion download`` itself (the fix differs)."""
    from huggingface_hub import errors as hf

    where = f"{model}" + (f" (revision {revision})" if revision else "")
    if isinstance(err, hf.GatedRepoError):
        return ModelLoadError(
            f"{where} is a gated repository: accept its terms at https://huggingface.co/{model} and log in "
            f"with `hf auth login` (or set HF_TOKEN), or use the ungated copy with --model {UNGATED_COPY}"
        )
    if isinstance(err, hf.RevisionNotFoundError):
        return ModelLoadError(
            f"{where}: no such revision on the hub: check --revision (a branch, tag or commit)"
        )
    if isinstance(err, hf.RepositoryNotFoundError):
        return ModelLoadError(
            f"{model}: no such model on the hub and no such local directory (or it needs a login: "
            f"`hf auth login`): check --model"
        )
    if isinstance(err, hf.LocalEntryNotFoundError) or _is_offline_error(err):
        fix = (
            "connect to the internet (and unset HF_HUB_OFFLINE) and try again"
            if downloading
            else f"connect and run `companion download --model {model}`, or pass a local directory with --model"
        )
        return ModelLoadError(
            f"{where} is not in the local cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1): {fix}"
        )
    if isinstance(err, hf.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return ModelLoadError(
                f"{where}: access denied ({status}): log in with `hf auth login` (or set HF_TOKEN) after "
                f"accepting the terms at https://huggingface.co/{model}, or use --model {UNGATED_COPY}"
            )
        return ModelLoadError(f"{where}: the hub answered {status or 'an error'}: try again later")
    return None


def _is_offline_error(err: BaseException) -> bool:
    name = type(err).__name__
    return name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled") or (
        "offline" in str(err).lower() and "cache" in str(err).lower()
    )


def resolve_model_dir(model: str, revision: str | None = None) -> tuple[Path, str]:
    """The local directory holding ``model`` (downloading it when needed) and its cache key.

    The key is ``id@commit`` for a hub id and ``path@hash`` for a local directory (the hash covers the
    weight files' names, sizes, and their first and last 64 KiB, so changed weights change the key).
    """
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or os.sep + os.sep in model:
        path = path.resolve()
        check_model_dir(path)
        return path, f"{path}@{weights_fingerprint(path)}"
    local = download_model(model, revision)
    return local, f"{model}@{local.name}"


def download_model(model: str, revision: str | None = None, *, downloading: bool = False) -> Path:
    """The snapshot directory of hub ``model`` in the HF cache, fetched (with progress bars) if needed."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(model, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as err:  # the hub's errors become one line; anything else is a bug to report
        mapped = hub_error(err, model, revision, downloading)
        if mapped is None:
            raise
        raise mapped from err
    check_model_dir(local)
    return local


def check_model_dir(path: Path) -> None:
    """Refuse a directory that is not a complete CSM checkpoint, naming the first thing missing."""
    if not path.is_dir():
        raise ModelLoadError(
            f"model directory {path} does not exist: check --model (a hub id or a directory)"
        )
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise ModelLoadError(
                f"{path} is not a complete CSM checkpoint: {name} is missing; download it again with "
                "`companion download` or point --model at a full copy"
            )
    if not weight_files(path):
        raise ModelLoadError(
            f"{path} is not a complete CSM checkpoint: no model.safetensors; download it again with "
            "`companion download` (only safetensors weights are loaded)"
        )


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def weights_fingerprint(path: Path) -> str:
    """A short hash of the weight files (names, sizes, first and last 64 KiB of each)."""
    digest = hashlib.sha256()
    for f in weight_files(path):
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(65536))
            fh.seek(max(0, size - 65536))
            digest.update(fh.read(65536))
    return digest.hexdigest()[:16]


def load_csm(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(CsmForConditionalGeneration, CsmProcessor)`` from a checked local directory, in eval mode."""
    from transformers import CsmForConditionalGeneration, CsmProcessor
    from transformers.utils import logging as hf_logging

    # transformers' per-weight progress bar and its config warnings are noise on a chat screen.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        processor = CsmProcessor.from_pretrained(path)
        # Loaded in float32, then every part but the codec cast to ``dtype``: Mimi keeps the checkpoint's
        # own float32 weights (a codec upcast from bf16-rounded weights encodes references differently).
        model = CsmForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        cast_all_but_codec(model, dtype)
        model = model.to(device)
    except torch.OutOfMemoryError as err:
        raise _out_of_memory(device) from err
    except MemoryError as err:
        raise _out_of_memory(device) from err
    except Exception as err:
        if "memory" in str(err).lower() and "alloc" in str(err).lower():
            raise _out_of_memory(device) from err
        raise ModelLoadError(
            f"cannot load the model from {path}: {type(err).__name__}: {_first_line(err)}; the files may be "
            "corrupt or incomplete: download them again with `companion download`"
        ) from err
    return model.eval(), processor


def cast_all_but_codec(model: Any, dtype: torch.dtype) -> None:
    """Cast the parameters of every part of ``model`` except ``codec_model`` to ``dtype``, in place.

    Only parameters: buffers (the RoPE frequencies in float32) stay as ``from_pretrained(dtype=...)``
    leaves them, so the result is bit-identical to loading in ``dtype`` directly, codec aside."""
    if dtype == torch.float32:
        return
    for name, child in model.named_children():
        if name == "codec_model":
            continue
        for param in child.parameters():
            param.data = param.data.to(dtype)


def _out_of_memory(device: torch.device) -> ModelLoadError:
    return ModelLoadError(
        f"not enough memory to load CSM-1B on {device.type} (about 9 GB while it loads; then 4.5 GB in "
        "bfloat16, 9 GB in float32): close other programs, use --dtype bfloat16, or another --device"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no details"
