"""`companion bench`: measure generation speed against transformers' generate and the hardware floor."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "measure generation speed against transformers' generate and the hardware floor [not implemented yet: issue 3]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion bench` is not implemented yet (issue 3)")
