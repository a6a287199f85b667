"""Command-line entry: argument parsing only. Each subcommand lives in ``companion/commands/NAME.py``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from companion import __version__
from companion.errors import CompanionError
from companion.oserrors import decode_text, describe, discard_stdout, quiet_broken_pipe

STDOUT = "standard output"  # how an error writing our output names it

# The one list of subcommands, in the order `--help` shows them. Each module defines
# HELP (one line), add_arguments(parser) and run(args) -> exit code.
COMMANDS = ["chat", "say", "voice", "batch", "history", "bench", "download", "devices", "doctor", "watermark", "eval", "serve", "key"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="companion",
        description="A terminal voice companion on Sesame CSM-1B: type, and hear a cloned voice answer.",
    )
    parser.add_argument("--version", action="version", version=f"companion {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"companion.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = bool(os.environ.get("COMPANION_DEBUG"))
    try:
        parser = build_parser()
        args = parser.parse_args(_text_args(sys.argv[1:] if argv is None else argv))
        debug = debug or bool(getattr(args, "debug", False))
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        code = int(args._run(args) or 0)
        _flush_stdout()  # a reader that went away, or a full disk, is found here, not in the interpreter's last flush
        return code
    except CompanionError as err:
        if debug:
            raise
        _error_line(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `companion history list | head -1`: the reader has what it wanted
        return quiet_broken_pipe()
    except OSError as err:  # the user's machine (a full disk, a read-only folder, ...): one line, from one place
        if debug:
            raise
        _error_line(describe(err))
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            discard_stdout()  # our output cannot be written: the interpreter's last flush must not try again
        return 1
    except Exception as err:  # an unexpected failure: still one line, unless --debug
        if debug:
            raise
        _error_line(f"unexpected {type(err).__name__}: {err} (run again with --debug for the traceback, and please report it)")
        return 1


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise type(err)(err.errno, err.strerror, STDOUT) from None


def _error_line(message: str) -> None:
    try:
        print(f"error: {message}", file=sys.stderr)
    except (BrokenPipeError, ValueError):
        pass


def _text_args(argv: Sequence[str]) -> list[str]:
    """Arguments as text: bytes that are not UTF-8 (which Python keeps as surrogates) are read by the
    rule stdin follows (companion.oserrors.decode_text)."""
    return [decode_text(arg.encode("utf-8", "surrogateescape"), "an argument") if _has_surrogates(arg) else arg
            for arg in argv]


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
