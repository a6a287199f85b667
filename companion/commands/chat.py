"""`companion chat`: talk with the companion in the terminal (REPL); reads lines from stdin when it is not a TTY.

Also holds what `say` shares with it: settings from the flags, the audio output (or the WAV
fallback) and loading the model and the session behind a progress line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from companion.commands.common import add_model_arguments, settings_from_args
from companion.config import Settings
from companion.errors import CompanionError, UsageError
from companion.paths import get_paths

if TYPE_CHECKING:
    from rich.console import Console

    from companion.audio.playback import AudioOutput
    from companion.repl.context import ChatContext
    from companion.session import Session
    from companion.voices import VoiceStore

HELP = "talk with the companion in the terminal (REPL); reads lines from stdin when it is not a TTY"
DESCRIPTION = (
    "Talk with the companion: each line you type is spoken in the chosen voice while you keep typing. "
    "/help lists the commands; Ctrl-C stops the speech, Ctrl-D quits. When stdin is not a terminal, "
    "each line read from it is spoken (or saved with --save-dir) in order."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voice", metavar="NAME", help="the voice to speak with (see `companion voice list`)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="ID",
                        help="continue a saved conversation (default: the latest; see `companion history list`)")
    parser.add_argument("--mode", choices=["speak", "chat"],
                        help="speak: what you type is spoken; chat: an LLM answers and its reply is spoken "
                             "(default: chat when llm.enabled is true in the config, else speak)")
    add_output_arguments(parser)
    parser.add_argument("--save-dir", type=Path, metavar="DIR",
                        help="write each reply as a WAV file in DIR instead of playing it (also /save's folder)")
    add_model_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-device", metavar="NUMBER|NAME", help="where to play (see `companion devices`)")
    parser.add_argument("--no-watermark", action="store_true", help="do not mark replies as AI-generated audio")


def run(args: argparse.Namespace) -> int:
    from companion.oserrors import output_folder, stdin_lines
    from companion.repl.app import run_interactive, run_lines
    from companion.repl.console import make_console, typing_held
    from companion.repl.talk import check_mode

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    console = make_console(interactive=interactive)
    settings = settings_for(args)
    check_before_loading(settings, args.resume)
    check_mode(getattr(args, "mode", None) or ("chat" if settings.llm.enabled else "speak"))  # an extra missing: now
    if args.save_dir is not None and args.save_dir.expanduser().exists() and not args.save_dir.expanduser().is_dir():
        raise UsageError(f"{args.save_dir}: --save-dir is a file: give a folder (it is created if missing)")
    if args.save_dir is not None:
        output_folder(args.save_dir, shown=f"--save-dir {args.save_dir}")
    save_dir = args.save_dir.expanduser() if args.save_dir else get_paths().audio_dir
    with ExitStack() as stack:
        with typing_held(sys.stdin) if interactive else nullcontext():  # no keys echoed into the spinner
            output = open_speech_output(settings, args.save_dir, console)
            session = stack.enter_context(load_session(settings, console, resume=args.resume))
        ctx = build_context(session, settings, output, save_dir, console, debug=_debug(args),
                            mode=getattr(args, "mode", None))
        stack.callback(ctx.worker.close)
        if interactive:
            return run_interactive(ctx, get_paths().input_history_file)
        return run_lines(ctx, stdin_lines())
    return 0


def _debug(args: argparse.Namespace) -> bool:
    import os

    return bool(getattr(args, "debug", False) or os.environ.get("COMPANION_DEBUG"))


def settings_for(args: argparse.Namespace) -> Settings:
    extra: dict[str, Any] = {"playback": {"output_device": args.output_device}, "voice": args.voice}
    if args.no_watermark:
        extra["watermark"] = {"enabled": False}
    return settings_from_args(args, extra)


def open_speech_output(settings: Settings, save_dir: Path | None, console: Console) -> AudioOutput:
    """The player; with ``save_dir`` (or when there is no sound) a WAV writer, after ONE warning line."""
    from companion.audio.playback import WavWriter, open_output
    from companion.repl.console import RichPrinter

    if save_dir is not None:
        return WavWriter(save_dir.expanduser())
    pb = settings.playback
    output, warning = open_output(pb.output_device, get_paths().audio_dir, prebuffer_ms=pb.prebuffer_ms,
                                  tail_silence_ms=pb.tail_silence_ms)
    if warning:
        RichPrinter(console).warn(warning)
    return output


def check_output_file(path: Path, flag: str, need_bytes: int | None = None) -> Path:
    """A WAV file that can be written (its folder created when its parent exists, writable, with room
    for ``need_bytes``): checked before the model loads. Returns the path with ``~`` expanded."""
    from companion.oserrors import output_file

    return output_file(path, flag, need_bytes=need_bytes)


def check_before_loading(settings: Settings, resume: str | None = None) -> None:
    """What can be checked without the model (the voice, its files, the conversation to resume): a
    mistake there is reported in a moment instead of after the model has loaded."""
    from companion.voices import DEFAULT_VOICE, VoiceStore

    if resume is not None:
        _check_resume(resume)
    if settings.voice and (settings.voice != DEFAULT_VOICE or settings.voice in VoiceStore().names()):
        voices = VoiceStore()
        problem = voices.problem(voices.get(settings.voice))
        if problem:
            raise CompanionError(problem)


def _check_resume(resume: str) -> None:
    from companion.store import Store

    wanted = _resume_id(resume)
    path = get_paths().history_db
    if not path.exists():
        raise CompanionError("there is no saved conversation to resume: start one with `companion chat`")
    with Store(path) as store:
        if wanted is None:
            if store.latest_session_id() is None:
                raise CompanionError("there is no saved conversation to resume: start one with `companion chat`")
        else:
            store.session(wanted)  # raises "no conversation N"


@contextmanager
def load_session(settings: Settings, console: Console, *, resume: str | None = None,
                 history: bool = True) -> Iterator[Session]:
    """Load the model (with a progress line), then a new session or the resumed one, with its voice."""
    from companion.commands.common import open_engine
    from companion.store import Store
    from companion.voices import VoiceStore

    check_before_loading(settings, resume if history else None)
    m = settings.model
    start = time.monotonic()
    with ExitStack() as stack:
        with console.status(f"loading {m.id} …", spinner="dots"):
            engine = stack.enter_context(open_engine(settings))
        # imported once the model is found: a missing model fails without loading the model code
        from companion.session import Session, resume_session

        console.print(f"[green]✓[/] model {m.id} loaded in {time.monotonic() - start:.1f} s", highlight=False)
        store = stack.enter_context(Store(get_paths().history_db)) if history else None
        voices = VoiceStore()
        if resume is not None and store is not None:
            session = resume_session(engine, settings, store, _resume_id(resume), voices)
            console.print(f"resumed conversation {session.session_id}", highlight=False)
        else:
            session = Session(engine, settings, store, voices)
        if settings.voice:
            with console.status(f"preparing voice {settings.voice} …", spinner="dots"):
                session.use_voice(settings.voice)
        elif resume is None:
            console.print(_default_voice_line(voices), highlight=False)
        yield session


def _default_voice_line(voices: VoiceStore) -> str:
    """Which voice speaks when none was chosen (the voice 'default', made from its first reply)."""
    from companion.voices import DEFAULT_VOICE

    others = [n for n in voices.names() if n != DEFAULT_VOICE]
    pick = "--voice narrator for the shipped example, " if "narrator" in others else "--voice NAME for another, "
    if DEFAULT_VOICE in voices.names():
        return f"voice: {DEFAULT_VOICE} (no --voice given; {pick}`companion voice list` shows all)"
    return (f"voice: {DEFAULT_VOICE} (no --voice given: a new voice made from its first reply and kept; "
            f"{pick}`companion voice list` shows all)")


def _resume_id(value: str) -> int | None:
    if value == "latest":
        return None
    if not value.isdigit():
        raise CompanionError(f"--resume {value}: expected a conversation number (see `companion history list`)")
    return int(value)


def build_context(session: Session, settings: Settings, output: AudioOutput, save_dir: Path, console: Console,
                  *, debug: bool = False, mode: str | None = None) -> ChatContext:
    """The REPL's context: the worker that speaks (as typed, or the LLM's reply), the printer, the commands."""
    from companion.repl.console import RichPrinter
    from companion.repl.context import ChatContext, Status
    from companion.repl.slash import build_registry
    from companion.repl.talk import Replies
    from companion.repl.turns import TurnWorker
    from companion.text import estimate_seconds
    from companion.voices import VoiceStore

    printer = RichPrinter(console)
    status = Status()

    def refresh() -> None:  # runs in the worker thread, the only one that touches the session
        status.voice = session.active or settings.voice or "default"
        status.context_used, status.context_budget = session.context_used(), session.context_budget()

    def expected(text: str) -> float:
        return min(1.5 * estimate_seconds(text) + 0.5, _max_reply_seconds(session, text))

    replies = Replies(session, settings, mode, on_text=printer.reply_text, on_end=printer.reply_end)
    worker = TurnWorker(replies, output, printer.event, estimate=lambda text: replies.expected_seconds(text, expected),
                        debug=debug, after_each=refresh)
    refresh()
    return ChatContext(session, settings, output, worker, printer, session.voice_store or VoiceStore(),
                       build_registry(), save_dir, status, replies=replies)


def _max_reply_seconds(session: Session, text: str) -> float:
    from companion.text import prepare

    segments = max(1, len(prepare(text, session.settings.generation.max_segment_seconds)))
    return segments * session.max_frames() / session.engine.frame_rate
