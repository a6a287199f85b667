"""A busy machine on demand: processes that spin on every core, and stalls (SIGSTOP/SIGCONT) of a process.

Used by the real-playback load tests and by benchmarks/playback_stalls.py. Every spinner ends by itself
after ``seconds`` even if the test that started it is killed, and is killed when the block ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def spinning(count: int | None = None, seconds: float = 600.0) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes (default: one per core) that keep a core busy for at most ``seconds``."""
    n = count if count is not None else (os.cpu_count() or 1)
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def stall(pid: int, seconds: float, *, group: bool = False) -> None:
    """Stop a process (or its process group) for ``seconds``, then let it go on."""
    send = os.killpg if group else os.kill
    send(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        send(pid, signal.SIGCONT)


@contextmanager
def stalling(pid: int, every: float, seconds: float, *, group: bool = False) -> Iterator[list[float]]:
    """Stall ``pid`` for ``seconds`` every ``every`` seconds while the block runs; yields the stall times."""
    done = threading.Event()
    times: list[float] = []

    def loop() -> None:
        while not done.wait(every):
            try:
                times.append(time.monotonic())
                stall(pid, seconds, group=group)
            except ProcessLookupError:
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        done.set()
        thread.join()
