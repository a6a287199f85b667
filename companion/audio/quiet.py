"""Keeping libasound's and PortAudio's own messages off the terminal.

libasound prints straight to stderr ("ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred"), over
the chat prompt. Two measures, both process-wide:

- ``silence_alsa()`` installs an error handler that drops every libasound message
  (``snd_lib_error_set_handler``). PortAudio loads the same libasound, so the handler covers it. The
  player counts underruns itself and ``/stats`` shows them.
- ``stderr_silenced()`` points file descriptor 2 at /dev/null while PortAudio starts, opens or closes a
  stream: PortAudio and the libraries it loads (JACK) write there during those calls, not through
  libasound. Anything another thread writes to stderr in those few milliseconds is lost too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# void handler(const char *file, int line, const char *function, int err, const char *fmt, ...): the
# variadic rest is never read, so a fixed five-argument callback receives what it needs.
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_char_p)


@_HANDLER_TYPE
def _drop(_file: bytes | None, _line: int, _function: bytes | None, _err: int, _fmt: bytes | None) -> None:
    return None


_installed = False
_lock = threading.Lock()
_fd_lock = threading.RLock()


def silence_alsa() -> bool:
    """Install the handler once (before PortAudio starts); False where there is no libasound (macOS, Windows)."""
    global _installed
    with _lock:
        if _installed:
            return True
        if not sys.platform.startswith("linux"):
            return False
        name = ctypes.util.find_library("asound") or "libasound.so.2"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return False
        lib.snd_lib_error_set_handler.argtypes = [_HANDLER_TYPE]
        lib.snd_lib_error_set_handler(_drop)  # _drop is module-level: it lives as long as the process
        _installed = True
        return True


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null inside the block (Python's sys.stderr object is untouched)."""
    with _fd_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 at all: nothing to protect
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
