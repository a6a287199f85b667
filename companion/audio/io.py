"""Audio files in and out: decode any WAV/MP3/FLAC/OGG to float32, write WAV atomically."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf

from companion.atomic import atomic_write_bytes
from companion.errors import CompanionError

FORMATS = "WAV, MP3, FLAC or OGG"
# A file that decodes to less than this share of the length its header declares is truncated.
MIN_DECODED_SHARE = 0.95


def read_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Decode ``path`` to float32 samples ``(n, channels)`` in [-1, 1] and its sample rate.

    Any sample rate, bit depth and channel count libsndfile reads. Every failure is a one-line
    CompanionError: missing path, directory, empty file, not audio, truncated file, no samples, NaN/Inf.
    A truncated file (one that decodes to much less than its header declares, e.g. a partly downloaded
    MP3) is refused rather than accepted as a prefix: its transcript would no longer match the audio.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        with _quiet_native_stderr():  # mpg123 prints warnings about damaged MP3 headers to fd 2
            handle = sf.SoundFile(str(path))
        with handle:
            declared, rate = handle.frames, handle.samplerate
            data = handle.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        detail = str(err).split(":")[-1].strip().rstrip(".") or type(err).__name__
        if "not a regular file" in detail:  # what libsndfile says of bytes it cannot parse as MP3
            detail = "its contents are not in a known audio format"
        raise CompanionError(
            f"{path}: not a readable audio file ({detail}): use a {FORMATS} file, or re-export it"
        ) from None
    if len(data) == 0:
        raise CompanionError(f"{path}: contains no audio samples: use a recording with speech in it")
    if declared > 0 and len(data) < MIN_DECODED_SHARE * declared:
        raise CompanionError(
            f"{path}: file is truncated: its header declares {declared / rate:.1f} s but only "
            f"{len(data) / rate:.1f} s can be decoded; re-download or re-export the complete file"
        )
    if not np.isfinite(data).all():
        raise CompanionError(f"{path}: contains NaN or infinite samples: re-export it as 16-bit PCM WAV or FLAC")
    return data, rate


def write_wav(path: str | os.PathLike[str], audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write ``audio`` ``(n,)`` or ``(n, channels)`` float in [-1, 1] to a WAV file, atomically."""
    samples = np.asarray(audio, dtype=np.float32)
    if subtype.startswith("PCM"):
        samples = np.clip(samples, -1.0, 1.0)
    atomic_write_bytes(path, encode_audio(samples, sample_rate, "WAV", subtype))


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """The file's bytes, made in memory: the disk is then written by plain file writes, whose OSError
    (a full disk, a read-only folder) says what happened; libsndfile's own says only "System error"."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, subtype=subtype, format=fmt)
    return buffer.getvalue()


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise CompanionError(f"{path}: file not found: check the path (relative paths start in the current folder)")
    if path.is_dir():
        raise CompanionError(f"{path}: is a directory: give one audio file ({FORMATS})")
    if path.stat().st_size == 0:
        raise CompanionError(f"{path}: file is empty (0 bytes): record or export it again")


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C libraries writing to file descriptor 2 (kept short: it covers only opening a file)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
