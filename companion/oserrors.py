"""The user's own machine: OS errors, output folders, broken pipes and stdin bytes, as the product's one line.

Everything here is the one place for its question, so that every command answers it the same way:

- ``describe(err)``: an OSError as "what is wrong with which path: how to fix it" (cli.py shows it for
  any OSError a command lets through, so no command needs its own try/except).
- ``output_folder(folder)`` / ``output_file(path, ...)``: an output checked before any model work. The
  rule: a missing folder is created when its parent exists, everywhere; the folder must take a file
  (probed by creating one), and, when the size can be estimated, hold it.
- ``decode_text(data, what)``: bytes the user gave (stdin, arguments), as text. The rule: UTF-8; text
  that is not UTF-8 is read as Windows-1252 (Latin-1, the usual other encoding), with one warning;
  input that is not text at all (a NUL byte, more than
  ``MAX_CONTROL`` of its bytes control codes, or more than ``MAX_UNDECODABLE`` not UTF-8, beyond ``FEW``
  of either) is refused.
- ``quiet_broken_pipe()``: the reader of our output went away (``| head``): end quietly.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from companion.errors import CompanionError, UsageError

MAX_CONTROL = 0.05  # share of bytes that may be control codes before input is "not text"
MAX_UNDECODABLE = 0.33  # share of bytes that may be outside UTF-8 (short Latin-1 text: "café olé" is 22%)
FEW = 4  # so many of either are always allowed (a short line: "é", or a pasted bell)
LEGACY, LEGACY_NAME = "cp1252", "Windows-1252 (Latin-1)"  # the usual encoding of text that is not UTF-8
BROKEN_PIPE_EXIT = 1  # as rich's own console ends on a broken pipe, so every command ends the same way
_CONTROL_BYTES = set(range(0x20)) - {0x09, 0x0A, 0x0C, 0x0D, 0x1B}  # ESC starts terminal codes, dropped later


def describe(err: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line for ``err``, naming ``path`` (default: the error's own file name) and what to do."""
    name = path if path is not None else err.filename
    where = str(name) if name is not None else "standard output"  # a write with no file name: print()
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {_folder_of(where)}: free some space or write somewhere else"
    if code == errno.EROFS:
        return f"{_folder_of(where)} is read-only: write somewhere else"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: check its permissions or use another path"
    if code == errno.ENOTDIR or (code == errno.EEXIST and Path(where).exists() and not Path(where).is_dir()):
        return f"not a folder: {_first_file(where)}: give a folder there"
    if code == errno.ELOOP:
        return f"symbolic link loop: {where}: fix or remove the link"
    if code == errno.EISDIR:
        return f"is a folder: {where}: give a file name"
    if code == errno.ENOENT:
        return f"not found: {where}: check the path"
    if code == errno.ENAMETOOLONG:
        return f"name too long: {where}: use a shorter name"
    if code == errno.EPIPE:
        return "the output was closed before everything was written"
    reason = (err.strerror or type(err).__name__).rstrip(".").lower()
    return f"{reason}: {where}"


def as_error(err: OSError, path: str | os.PathLike[str] | None = None) -> CompanionError:
    return CompanionError(describe(err, path))


def _folder_of(where: str) -> str:
    """The folder for a file that does not exist yet (the folder is what is full or read-only)."""
    p = Path(where)
    return str(p.parent) if not p.exists() and str(p.parent) not in ("", ".") else where


def _first_file(where: str) -> str:
    """The part of ``where`` that is a file where a folder was needed."""
    p = Path(where)
    for part in [*reversed(p.parents), p]:
        if part.exists() and not part.is_dir():
            return str(part)
    return where


# ---- outputs -----------------------------------------------------------------------------------

_UNEXPANDED = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


def output_folder(folder: Path, *, shown: str | None = None, need_bytes: int | None = None) -> Path:
    """``folder`` (``~`` expanded), created when its parent exists, able to take a file of ``need_bytes``.

    ``shown`` is how the user wrote the output (a flag and its value), for the messages. Raises the
    one-line error otherwise; commands call it before the model loads."""
    shown = shown or str(folder)
    var = _UNEXPANDED.search(str(folder))
    if var and not folder.expanduser().exists():
        raise UsageError(f"{shown}: {var.group(0)} was not replaced by its value: write the path out in full")
    folder = folder.expanduser()
    try:
        if folder.is_symlink():
            os.stat(folder)  # a loop or a link to nothing: its own OSError says which
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"not a folder: {_first_file(str(folder))}: give a folder")
        if not folder.exists():
            if not folder.absolute().parent.is_dir():
                raise UsageError(f"{shown}: folder {folder} does not exist: create it first or write somewhere else")
            folder.mkdir()
        fd, probe = tempfile.mkstemp(prefix=".companion-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        if need_bytes is not None:
            free = shutil.disk_usage(folder).free
            if free < need_bytes:
                raise CompanionError(f"no space left on {folder}: {_mb(free)} free, about {_mb(need_bytes)} needed: "
                                     "free some space or write somewhere else")
    except OSError as err:
        raise as_error(err, folder) from None
    return folder


def output_file(path: Path, flag: str, *, need_bytes: int | None = None) -> Path:
    """A WAV file to write (``~`` expanded): a .wav name, not a folder, in a folder ``output_folder`` accepts."""
    if path.suffix.lower() != ".wav":
        raise UsageError(f"{path}: {flag} writes WAV files: give a name ending in .wav")
    path = path.expanduser()
    if path.is_dir():
        raise UsageError(f"{path}: is a folder: give a file name ending in .wav")
    output_folder(path.parent, shown=str(path), need_bytes=need_bytes)
    return path


def unique_path(folder: Path, prefix: str, suffix: str = ".wav") -> Path:
    """A new file ``PREFIX-YYYYMMDD-HHMMSS-NNN SUFFIX`` in ``folder`` (NNN the first number free, so names
    sort in the order they were made), reserved at once (created empty with O_EXCL): two saves in the
    same second, from one process or two, never share a name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = folder / f"{prefix}-{stamp}-{n:03d}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        except OSError as err:
            raise as_error(err, path) from None
        return path
    raise AssertionError("unreachable")


def wav_bytes(seconds: float, sample_rate: int = 24000, channels: int = 1) -> int:
    """The size of a 16-bit WAV of ``seconds`` (with room for the temporary copy beside it)."""
    return int(seconds * sample_rate * channels * 2) + 4096


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


# ---- stdin -------------------------------------------------------------------------------------

class _Warned:
    done = False


def warn_once(message: str) -> None:
    if not _Warned.done:
        _Warned.done = True
        print(f"warning: {message}", file=sys.stderr, flush=True)


def decode_text(data: bytes, what: str = "stdin", source: str | None = None) -> str:
    """``data`` as text by the rule in the module docstring (one warning line; UsageError if not text).

    ``what`` names the input in the refusal ("stdin line 3"), ``source`` in the warning ("stdin")."""
    if not data:
        return ""
    bad = data.decode("utf-8", errors="replace").count("\ufffd") - data.count(b"\xef\xbf\xbd")
    controls = sum(1 for b in data if b in _CONTROL_BYTES)
    if b"\0" in data or controls > max(FEW, MAX_CONTROL * len(data)) or bad > max(FEW, MAX_UNDECODABLE * len(data)):
        raise UsageError(f"{what} is not text (it holds binary data): give UTF-8 text")
    if not bad:
        return data.decode("utf-8")
    warn_once(f"{source or what} is not UTF-8: read as {LEGACY_NAME}; if words come out wrong, save it as UTF-8")
    return data.decode(LEGACY, errors="replace").replace("\ufffd", "")


def text_lines(stream: Iterable[bytes], what: str = "stdin") -> Iterator[str]:
    """Lines of a byte stream, each decoded by ``decode_text``'s rule."""
    for number, raw in enumerate(stream, start=1):
        yield decode_text(raw, f"{what} line {number}" if number > 1 else what, what)


def read_stdin_text() -> str:
    """All of stdin, decoded by the rule."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced sys.stdin (tests): already text
        return sys.stdin.read()
    return decode_text(buffer.read())


def stdin_lines() -> Iterator[str]:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from sys.stdin
        return
    yield from text_lines(buffer)


# ---- broken pipes ------------------------------------------------------------------------------

def quiet_broken_pipe() -> int:
    """Our reader went away: point stdout at nothing (so the final flush cannot fail) and end quietly."""
    discard_stdout()
    return BROKEN_PIPE_EXIT


def discard_stdout() -> None:
    """Point stdout at nothing: what is still buffered for a reader that went away (or a full disk) is
    dropped by the interpreter's last flush instead of failing it with a second message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
