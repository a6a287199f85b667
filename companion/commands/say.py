"""`companion say`: speak one text and play it or write it to a WAV file."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from companion.commands.chat import (
    add_output_arguments,
    check_before_loading,
    check_output_file,
    load_session,
    open_speech_output,
    settings_for,
)
from companion.commands.common import add_model_arguments
from companion.commands.progress import EXPECTED_FACTOR, SayProgress
from companion.errors import CompanionError
from companion.repl.console import RichPrinter

if TYPE_CHECKING:
    from rich.console import Console

HELP = "speak one text and play it or write it to a WAV file"
DESCRIPTION = "Speak TEXT (or stdin with '-') in a voice: played as it is generated, or written with -o FILE.wav."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="what to say ('-' reads it from stdin)")
    parser.add_argument("--voice", metavar="NAME", help="the voice to speak with (see `companion voice list`)")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE.wav", help="write a WAV file instead of playing")
    add_output_arguments(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from companion.oserrors import read_stdin_text, wav_bytes
    from companion.repl.console import make_console
    from companion.text import estimate_seconds, speakable

    text = read_stdin_text() if args.text == "-" else args.text
    settings = settings_for(args)
    segments = speakable(text, settings.generation.max_segment_seconds)  # the one rule for nothing to speak
    expected = EXPECTED_FACTOR * sum(estimate_seconds(s) for s in segments)
    target = None if args.output is None else check_output_file(args.output, "-o", need_bytes=wav_bytes(expected))
    console = make_console(interactive=False)
    check_before_loading(settings)
    progress = SayProgress(len(segments), expected)
    output = None if target is not None else open_speech_output(settings, None, console)
    with load_session(settings, console, history=False) as session:
        chunks = progress.follow(session, session.speak(text, cancel=threading.Event()))
        if target is not None:
            return _write(target, chunks, session.engine.sample_rate, progress, console)
        assert output is not None
        report = output.play(chunks)
        where = f": {report.path}" if report.path else ""
        RichPrinter(console).success(
            f"said {report.seconds:.1f} s{where}" + (f" ({report.underruns} underruns)" if report.underruns else ""))
    return 0


def _write(path: Path, chunks: Iterable[np.ndarray], rate: int, progress: SayProgress, console: Console) -> int:
    """Write the audio to ``path``; on Ctrl-C, the parts finished so far (and say so)."""
    from companion.audio.io import write_wav

    printer = RichPrinter(console)
    try:
        audio = _collect(chunks)
    except KeyboardInterrupt:
        kept = progress.finished_audio()
        if not len(kept):
            printer.warn("interrupted before the first part was finished: nothing written")
            return 130
        write_wav(path, kept, rate)
        printer.warn(f"interrupted: wrote the {progress.done} of {progress.total} parts finished "
                     f"({len(kept) / rate:.1f} s) to {path}")
        return 130
    write_wav(path, audio, rate)
    printer.success(f"wrote {len(audio) / rate:.1f} s to {path}")
    return 0


def _collect(chunks: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(chunks)
    if not parts:
        raise CompanionError("the model produced no audio for this text: try again or with other words")
    return np.concatenate(parts).astype(np.float32)
