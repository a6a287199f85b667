"""The one table of slash-commands: /help, completion, dispatch and the docs are all built from it.

A command is a name, aliases, a one-line help, an argument synopsis, an optional source of argument
completions and a handler. The input loop never tests command names itself: it asks the registry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from companion.errors import CompanionError

Ctx = TypeVar("Ctx")


class Quit(Exception):  # noqa: N818 - a signal, not an error
    """Raised by /quit's handler: the REPL ends cleanly."""


@dataclass(frozen=True)
class SlashCommand(Generic[Ctx]):
    name: str  # without the slash
    help: str  # one line, shown by /help
    handler: Callable[[Ctx, str], None]  # (context, the rest of the line)
    aliases: tuple[str, ...] = ()
    usage: str = ""  # argument synopsis, e.g. "NAME" or "[FILE | --all]"
    complete: Callable[[Ctx], Iterable[str]] | None = None  # candidates for the first argument

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def synopsis(self) -> str:
        return f"/{self.name} {self.usage}".rstrip()


@dataclass
class Registry(Generic[Ctx]):
    commands: list[SlashCommand[Ctx]] = field(default_factory=list)
    # Whole lines that stand for a command (the seed's `$CLEAR$`), mapped to the command's name.
    literal_lines: dict[str, str] = field(default_factory=dict)

    def add(self, command: SlashCommand[Ctx]) -> None:
        taken = {n for c in self.commands for n in c.names}
        clash = taken.intersection(command.names)
        if clash:
            raise ValueError(f"slash-command name already registered: {sorted(clash)}")
        self.commands.append(command)

    def __iter__(self) -> Iterator[SlashCommand[Ctx]]:
        return iter(self.commands)

    def find(self, name: str) -> SlashCommand[Ctx] | None:
        name = name.lstrip("/").lower()
        return next((c for c in self.commands if name in c.names), None)

    def all_names(self) -> list[str]:
        """Every name and alias with its slash, in table order: what completion offers."""
        return [f"/{n}" for c in self.commands for n in c.names]

    def is_command(self, line: str) -> bool:
        line = line.strip()
        return line.startswith("/") or line in self.literal_lines

    def parse(self, line: str) -> tuple[SlashCommand[Ctx], str]:
        """The command a line names and its argument text; CompanionError (with a suggestion) if unknown."""
        line = line.strip()
        if line in self.literal_lines:
            line = "/" + self.literal_lines[line]
        word, _, rest = line[1:].partition(" ")
        command = self.find(word)
        if command is None:
            raise CompanionError(self.unknown_message(word))
        return command, rest.strip()

    def dispatch(self, ctx: Ctx, line: str) -> None:
        command, arg = self.parse(line)
        command.handler(ctx, arg)

    def unknown_message(self, word: str) -> str:
        close = difflib.get_close_matches(word.lower(), [n for c in self.commands for n in c.names], n=1, cutoff=0.5)
        hint = f"did you mean /{close[0]}?" if close else "type /help for the list"
        return f"unknown command /{word}: {hint}"

    def argument_candidates(self, ctx: Ctx, name: str) -> list[str]:
        command = self.find(name)
        if command is None or command.complete is None:
            return []
        return list(command.complete(ctx))

    def help_rows(self) -> list[tuple[str, str, str]]:
        """(synopsis, aliases, help) for every command, in table order."""
        return [(c.synopsis(), ", ".join(f"/{a}" for a in c.aliases), c.help) for c in self.commands]

    def markdown(self) -> str:
        """The commands as a Markdown table (docs/chat.md holds this text; a test keeps them equal)."""
        rows = ["| command | aliases | what it does |", "| --- | --- | --- |"]
        for synopsis, aliases, text in self.help_rows():
            cells = [f"`{synopsis}`", aliases, text]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(rows) + "\n"
