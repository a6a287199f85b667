"""Encoded-reference cache: the Mimi codes ``(K, T)`` of a prepared reference, on disk (safetensors).

The key is the raw audio files' content hashes + the preparation settings (and pipeline version) + the
engine's ``model_key`` + its ``codec_key`` (the codec's dtype, device and a fingerprint of its weights:
codes encoded in another precision, on another device or by other weights may differ, so they are never
reused across them). The transcript is not part of it: the codes depend on the audio only. A hit
costs hashing the files and reading one small safetensors file: no decoding, preparation or codec.

Threads (serve and batch speak several voices at once): ``making()`` is one lock for the whole
process, held while a reference is looked up and made (hash, encode, store) or saved with its
profile, so a reference is encoded once however many replies need it at the same moment, and a
profile's audio and its cached codes are always written as a pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from companion.atomic import atomic_write
from companion.audio.prepare import settings_fingerprint
from companion.config import ReferenceSettings
from companion.paths import get_paths

CACHE_FORMAT = 1
_MAKING = threading.RLock()  # one reference made (or saved) at a time in this process


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReferenceCache:
    """Codes of prepared references under ``paths.reference_cache_dir``, one ``KEY.safetensors`` each."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else get_paths().reference_cache_dir
        self.hits = 0
        self.misses = 0

    def key(self, files: Sequence[Path], settings: ReferenceSettings, model_key: str, codec_key: str) -> str:
        """The cache key for these audio files, prepared with ``settings``, encoded by ``model_key``'s
        codec as ``codec_key`` describes it (dtype, device, weights)."""
        parts = {
            "format": CACHE_FORMAT,
            "audio": [file_digest(f) for f in files],
            "preparation": settings_fingerprint(settings),
            "model": model_key,
            "codec": codec_key,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]

    @staticmethod
    def making() -> threading.RLock:
        """The lock to hold while a reference is looked up and made, or saved with its profile."""
        return _MAKING

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached codes ``(K, T)`` int64, or None (missing or unreadable: it will be rewritten)."""
        path = self.path_for(key)
        try:
            codes = load_file(str(path))["codes"]
        except (FileNotFoundError, SafetensorError, KeyError, OSError):
            self.misses += 1
            return None
        if codes.dim() != 2 or codes.dtype != torch.int64:
            self.misses += 1
            return None
        self.hits += 1
        return codes

    def put(self, key: str, codes: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
        """Store ``codes`` ``(K, T)`` atomically (a crash leaves the old file or none, never half a file)."""
        path = self.path_for(key)
        tensor = codes.detach().to("cpu", torch.int64).contiguous()
        atomic_write(path, lambda tmp: save_file({"codes": tensor}, str(tmp), metadata=metadata or {}))
        return path

    def clear(self) -> int:
        """Delete every cached reference; returns how many files were removed."""
        removed = 0
        for path in self.directory.glob("*.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
