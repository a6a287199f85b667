"""`companion say`: speak one text and play it or write it to a WAV file."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

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
from companion.errors import CompanionError, UsageError

HELP = "speak one text and play it or write it to a WAV file"
DESCRIPTION = "Speak TEXT (or stdin with '-') in a voice: played as it is generated, or written with -o FILE.wav."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="what to say ('-' reads it from stdin)")
    parser.add_argument("--voice", metavar="NAME", help="the voice to speak with (see `companion voice list`)")
    parser.add_argument("-o", "--output", type=Path, metavar="FILE.wav", help="write a WAV file instead of playing")
    add_output_arguments(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from companion.audio.io import write_wav
    from companion.repl.console import RichPrinter, make_console
    from companion.text import NOTHING_TO_SAY, prepare

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise UsageError("nothing to say: give some text (or '-' to read it from stdin)")
    if not prepare(text):
        raise UsageError(NOTHING_TO_SAY)
    if args.output is not None:
        check_output_file(args.output, "-o")
    console = make_console(interactive=False)
    printer = RichPrinter(console)
    settings = settings_for(args)
    check_before_loading(settings)
    output = None if args.output else open_speech_output(settings, None, console)
    with load_session(settings, console, history=False) as session:
        chunks = session.speak(text, cancel=threading.Event())
        if output is None:
            audio = _collect(chunks)
            write_wav(args.output, audio, session.engine.sample_rate)
            printer.success(f"wrote {len(audio) / session.engine.sample_rate:.1f} s to {args.output}")
            return 0
        report = output.play(chunks)
        where = f": {report.path}" if report.path else ""
        printer.success(f"said {report.seconds:.1f} s{where}" + (f" ({report.underruns} underruns)" if report.underruns else ""))
    return 0


def _collect(chunks: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(chunks)
    if not parts:
        raise CompanionError("the model produced no audio for this text: try again or with other words")
    return np.concatenate(parts).astype(np.float32)
