"""`companion doctor`: check the installation: torch, device, audio, model cache, config."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "check the installation: torch, device, audio, model cache, config [not implemented yet: issue 2]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion doctor` is not implemented yet (issue 2)")
