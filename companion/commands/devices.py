"""`companion devices`: list audio output devices."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "list audio output devices [not implemented yet: issue 5]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion devices` is not implemented yet (issue 5)")
