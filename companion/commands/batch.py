"""`companion batch`: render a script of lines to numbered WAV files and the whole conversation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from companion.commands.common import add_model_arguments, open_engine, settings_from_args
from companion.errors import CompanionError
from companion.textfile import read_text_file

if TYPE_CHECKING:
    from companion.config import Settings
    from companion.engine import Engine
    from companion.session import Session

HELP = "render a script (one line per utterance) to numbered WAV files and the whole conversation"
DESCRIPTION = """Render SCRIPT to DIR: one WAV file per line (001-VOICE.wav, 002-...) and conversation.wav.
Script lines: plain text is spoken by --voice; `name: text` by the voice `name`; `a || b` alternates
between the voices used so far; `$CLEAR$` forgets the conversation; `#` starts a comment line.
The conversation is recorded in the history (see `companion history`) unless --no-history."""
CONVERSATION_FILE = "conversation.wav"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", type=Path, help="the script: a UTF-8 text file, one utterance per line")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder for the WAV files")
    parser.add_argument("--voice", help="voice for lines without a `name:` (default: the config's voice)")
    parser.add_argument("--seed", type=int, help="make the rendering reproducible")
    parser.add_argument("--no-history", action="store_true", help="do not record the conversation in the history")
    add_model_arguments(parser)


def read_script_file(path: Path) -> list[str]:
    from companion.session import read_script

    text = read_text_file(path, "script")
    lines = read_script(text)
    if not lines:
        raise CompanionError(f"{path}: the script has no lines to speak: write one utterance per line")
    from companion.session.script import is_clear
    from companion.text import NOTHING_TO_SAY, prepare

    for line in lines:
        if not is_clear(line) and not prepare(line):  # found now, not after the lines before it were rendered
            raise CompanionError(f"{path}: {line!r}: {NOTHING_TO_SAY}: remove the line or write words")
    return lines


def run(args: argparse.Namespace) -> int:
    from companion.commands.chat import check_before_loading

    lines = read_script_file(args.script)
    settings = settings_from_args(args, {"voice": args.voice, "generation": {"seed": args.seed}})
    check_before_loading(settings)
    _check_output(args.output)
    with open_engine(settings) as engine:
        return _render_script(engine, settings, lines, args)


def _render_script(engine: Engine, settings: Settings, lines: list[str], args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from companion.session import Session
    from companion.session.script import is_clear
    from companion.store import Store
    from companion.voices import VoiceStore

    store = None if args.no_history else Store()
    session = Session(engine, settings, store, VoiceStore())
    if settings.voice:
        session.use_voice(settings.voice)  # an unknown voice fails before any work
    console = Console(file=sys.stderr)
    spoken = [ln for ln in lines if not is_clear(ln)]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    written: list[Path] = []
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("rendering", total=len(spoken))
            for line in lines:
                if is_clear(line):
                    session.clear()
                    continue
                path = _render_line(session, line, args.output, len(written) + 1)
                written.append(path)
                progress.advance(task)
        _write(args.output / CONVERSATION_FILE, session.conversation_audio(), engine.sample_rate)
    finally:
        if store is not None:
            store.close()
        session.close()
    seconds = session.log.seconds
    where = f"; history conversation {session.session_id}" if session.session_id is not None else ""
    print(f"wrote {len(written)} lines and {CONVERSATION_FILE} ({seconds:.1f} s) to {args.output}{where}")
    return 0


def _check_output(directory: Path) -> None:
    from companion.oserrors import output_folder

    output_folder(directory, shown=f"-o {directory}")  # the rule every output follows


def _render_line(session: Session, line: str, directory: Path, number: int) -> Path:
    """Speak one script line; write its audio as NNN-VOICE.wav."""
    chunks = list(session.speak(line))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    path = directory / f"{number:03d}-{'+'.join(session.reply_voices) or 'none'}.wav"
    _write(path, audio, session.engine.sample_rate)
    return path


def _write(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    from companion.audio.io import write_wav

    write_wav(path, audio, sample_rate)
