"""`companion watermark`: embed or detect companion's audio watermark in a WAV file."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "embed or detect companion's audio watermark in a WAV file [not implemented yet: issue 2]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion watermark` is not implemented yet (issue 2)")
