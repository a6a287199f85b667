"""`companion history`: list, show and export past conversations."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "list, show and export past conversations [not implemented yet: issue 4]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion history` is not implemented yet (issue 4)")
