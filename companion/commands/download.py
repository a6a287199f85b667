"""`companion download`: download the model into the local cache (explains gated repos)."""

from __future__ import annotations

import argparse

from companion.errors import CompanionError

HELP = "download the model into the local cache (explains gated repos) [not implemented yet: issue 3]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise CompanionError("`companion download` is not implemented yet (issue 3)")
