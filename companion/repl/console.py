"""rich output: status lines, errors, tables, and how a finished turn is reported."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from companion.repl.turns import TurnEvent
from companion.text.stream import SentenceSplitter


def make_console(*, interactive: bool) -> Console:
    """A console that writes to the current sys.stdout (patch_stdout replaces it in the REPL)."""
    if interactive:
        return Console(force_terminal=True, width=_terminal_width(), highlight=False, soft_wrap=True)
    return Console(highlight=False, soft_wrap=True, width=max(80, shutil.get_terminal_size((100, 24)).columns))


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size((100, 24)).columns


@contextmanager
def typing_held(stream: TextIO) -> Iterator[None]:
    """While the model and the voice load: keys typed are not echoed (they would land in the spinner's
    line) but kept by the terminal, so the prompt receives them when it starts."""
    try:
        import termios
    except ImportError:  # Windows: nothing to do
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflags: no echo; canonical input stays on, so nothing is lost
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (OSError, ValueError, termios.error):  # not a terminal
        yield
        return
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def error_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class RichPrinter:
    """The Printer the slash-commands and the worker use. Text is never parsed as markup."""

    def __init__(self, console: Console, errors: Console | None = None) -> None:
        self.console = console
        self.errors = errors or console
        self.errors_shown = 0
        self._replying = False  # an LLM reply's text is being shown
        self._pending = SentenceSplitter()  # on a terminal: the reply is shown sentence by sentence
        self._lock = threading.Lock()

    PREFIX = "companion: "

    def reply_text(self, piece: str) -> None:
        """Show a piece of the LLM's reply as it arrives (called from the thread reading it).

        On a terminal each sentence is shown once it is complete, on its own line (the prompt below
        redraws after every write, and would wipe a half-written line); elsewhere the pieces are
        written as they come."""
        with self._lock:
            if not self.console.is_terminal:
                if not self._replying:
                    self.console.print(Text(self.PREFIX, style="bold magenta"), end="")
                self._replying = True
                self.console.print(Text(piece), end="")
                self.console.file.flush()
                return
            for sentence in self._pending.feed(piece):
                self._reply_line(sentence)

    def reply_end(self) -> None:
        with self._lock:
            for sentence in self._pending.flush():
                self._reply_line(sentence)
            if self._replying and not self.console.is_terminal:
                self.console.print()
            self._replying = False

    def _reply_line(self, text: str) -> None:
        if not text.strip():
            return
        lead = Text(self.PREFIX, style="bold magenta") if not self._replying else Text(" " * len(self.PREFIX))
        self._replying = True
        self.console.print(lead + Text(text.strip()))

    def info(self, text: str) -> None:
        self.console.print(Text(text, style="cyan"))

    def success(self, text: str) -> None:
        self.console.print(Text("✓ ", style="green") + Text(text))

    def warn(self, text: str) -> None:
        self.errors.print(Text("warning: ", style="bold yellow") + Text(text))

    def error(self, text: str) -> None:
        self.errors_shown += 1
        self.errors.print(Text("error: ", style="bold red") + Text(text))

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        table = Table(title=title, title_justify="left", show_header=any(columns), header_style="bold")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        self.console.print(table)

    def event(self, event: TurnEvent) -> None:
        """One line per finished, cancelled or failed turn."""
        if event.kind == "error":
            self.error(event.message)
        elif event.kind == "cancelled":
            self.console.print(Text(f"⏹ cancelled (stopped in {event.elapsed_s * 1000:.0f} ms)", style="yellow"))
        elif event.kind == "done":
            self.console.print(Text(_done_line(event), style="dim"))

    def flush(self) -> None:
        self.console.file.flush()
        sys.stderr.flush()


def _done_line(event: TurnEvent) -> str:
    s = event.stats
    parts = [f"♪ {s.audio_s:.1f} s"]
    if s.first_chunk_s is not None:
        parts.append(f"first audio {s.first_chunk_s * 1000:.0f} ms")
    if s.rtf is not None:
        parts.append(f"RTF {s.rtf:.2f}")
    if s.underruns:
        parts.append(f"{s.underruns} underruns")
    if s.path:
        parts.append(f"saved {s.path}")
    return " · ".join(parts)
