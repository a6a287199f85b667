"""Command-line entry: argument parsing only. Each subcommand lives in ``companion/commands/NAME.py``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from companion import __version__
from companion.errors import CompanionError

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
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("COMPANION_DEBUG"))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CompanionError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: still one line, unless --debug
        if debug:
            raise
        print(
            f"error: unexpected {type(err).__name__}: {err} (run again with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
