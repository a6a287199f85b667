"""Atomic file writes: write a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` and move the result over ``path`` in one step.

    A crash at any point leaves either the old file or the new one, never a half-written file. An
    OSError names ``path`` (not the temporary file), so the one line the user sees is about their file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _about(err, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _about(err, path) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _about(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` when it named a temporary file beside it (or nothing)."""
    if err.errno is None or (err.filename is not None and not str(err.filename).endswith(".tmp")):
        return err
    return type(err)(err.errno, err.strerror, str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))
