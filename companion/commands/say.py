"""`companion say`: speak one text and play it or write it to a WAV file."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "speak one text and play it or write it to a WAV file [not implemented yet: issue 5]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion say` is not implemented yet (issue 5)")
