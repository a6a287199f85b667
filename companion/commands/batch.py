"""`companion batch`: render a script of lines to audio files."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "render a script of lines to audio files [not implemented yet: issue 4]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion batch` is not implemented yet (issue 4)")
