"""Reading a text file the user named (script, transcript, YAML), with one-line errors."""

from __future__ import annotations

from pathlib import Path

from companion.errors import CompanionError


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names the file in errors ("script", "transcript file")."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompanionError(f"{path}: {what} not found: check the path") from None
    except IsADirectoryError:
        raise CompanionError(f"{path}: is a directory: give the {what}'s path") from None
    except UnicodeDecodeError:
        raise CompanionError(f"{path}: {what} is not UTF-8 text: save it as UTF-8") from None
