"""`companion chat`: talk with the companion in the terminal (REPL); reads lines from stdin when it is not a TTY."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "talk with the companion in the terminal (REPL); reads lines from stdin when it is not a TTY [not implemented yet: issue 5]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion chat` is not implemented yet (issue 5)")
