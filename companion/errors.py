"""The program's own error: one line that says what is wrong and how to fix it."""

from __future__ import annotations


class CompanionError(Exception):
    """A user-facing failure. ``str(err)`` is the one line shown to the user (no traceback).

    Write the message as "what is wrong: how to fix it", e.g.
    ``"voices/bob.yaml: unknown key 'speeker' (line 3): expected one of name, audio, ..."``.
    """

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " ").strip())


class UsageError(CompanionError):
    """Bad command-line usage (exit code 2, as argparse)."""

    exit_code = 2
