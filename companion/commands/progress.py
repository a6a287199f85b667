"""Progress of a long `say`: a bar on a terminal, a line per finished part elsewhere, and one warning
when the work ahead is long; and the one bar of a batch (``work_bar``).

A part is one generation (a segment of the text). The session records each finished (or stopped)
segment in ``session.stats``; a new record between two chunks is the boundary between two parts, so
the audio of the parts finished so far is known at any moment (what Ctrl-C keeps).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from companion.session import Session

EXPECTED_FACTOR = 1.5  # the speech estimate is of slow speech; CSM may still run longer (as chat's expectation)
SHOW_FROM_PARTS = 2  # a single generation shows no progress (a few sentences)
LONG_WORK_SECONDS = 600.0  # work estimated longer than this is announced with a warning


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


class SayProgress:
    """Follows the chunks of one `say`, shows progress on stderr, and keeps the finished parts' audio."""

    def __init__(self, total: int, expected_seconds: float, stream: Any = None) -> None:
        self.total = total
        self.expected = expected_seconds  # of speech, estimated from the text
        self.stream = stream if stream is not None else sys.stderr
        self._chunks: list[np.ndarray] = []
        self._ends: list[int] = []  # for each finished part, how many of _chunks it ends at (one append: Ctrl-C safe)
        self._warned = False
        if expected_seconds > LONG_WORK_SECONDS:
            self._line(f"warning: this text is about {_duration(expected_seconds)} of speech and takes a while to "
                       "make; Ctrl-C stops it (with -o, the parts finished are written)")
            self._warned = True

    @property
    def done(self) -> int:
        return len(self._ends)

    @property
    def shown(self) -> bool:
        return self.total >= SHOW_FROM_PARTS

    def finished_audio(self) -> np.ndarray:
        if not self._ends or not self._ends[-1]:
            return np.zeros(0, np.float32)
        return np.concatenate(self._chunks[: self._ends[-1]]).astype(np.float32)

    def follow(self, session: Session, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """``chunks`` unchanged; on the way, a line (or the bar) for each part finished."""
        start = time.monotonic()
        last = session.stats[-1] if session.stats else None
        bar = self._bar()
        try:
            for chunk in chunks:
                if (session.stats[-1] if session.stats else None) is not last:
                    last = session.stats[-1]
                    self._part_done(start, bar)
                self._chunks.append(chunk)
                yield chunk
            if (session.stats[-1] if session.stats else None) is not last:
                self._part_done(start, bar)
        finally:
            if bar is not None:
                bar[0].stop()

    def _bar(self) -> tuple[Any, Any] | None:
        if not self.shown or not getattr(self.stream, "isatty", lambda: False)():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("speaking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=True)
        progress.start()
        return progress, progress.add_task("speaking", total=self.total)

    def _part_done(self, start: float, bar: tuple[Any, Any] | None) -> None:
        self._ends.append(len(self._chunks))  # what Ctrl-C keeps from now on, and the count, in one step
        self.total = max(self.total, self.done)  # a segment too long for the context is cut once more
        if not self.shown:
            return
        made = sum(len(c) for c in self._chunks) / 24000
        elapsed = time.monotonic() - start
        left = max(0.0, self.expected - made) * elapsed / max(made, 1e-3) if self.done < self.total else 0.0
        if bar is not None:
            bar[0].update(bar[1], completed=self.done)
        else:
            tail = f", about {_duration(left)} left" if self.done < self.total else ""
            self._line(f"part {self.done} of {self.total} done ({made:.1f} s of audio{tail})")
        if left > LONG_WORK_SECONDS and not self._warned:
            self._warned = True
            self._line(f"warning: about {_duration(left)} of work left at this speed; Ctrl-C stops it "
                       "(with -o, the parts finished are written)")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


@contextmanager
def work_bar(description: str, total: int, console: Any) -> Iterator[Callable[[], None]]:
    """One bar on ``console`` for ``total`` pieces of work (the lines of a batch, all its scripts together);
    yields ``advance()``, which any thread may call when it finishes a piece."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)  # rich's Progress takes its own lock
