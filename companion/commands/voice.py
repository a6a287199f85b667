"""`companion voice`: manage voice profiles: add, list, show, remove."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "manage voice profiles: add, list, show, remove [not implemented yet: issue 2]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion voice` is not implemented yet (issue 2)")
