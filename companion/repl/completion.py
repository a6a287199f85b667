"""Tab completion built from the registry: command names and aliases, then each command's arguments."""

from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from companion.repl.context import ChatContext


class SlashCompleter(Completer):
    def __init__(self, ctx: ChatContext) -> None:
        self.ctx = ctx

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            yield from self._literal(text)
            return
        word, space, arg = text.partition(" ")
        if not space:
            yield from self._names(word)
        elif " " not in arg:
            for candidate in self.ctx.registry.argument_candidates(self.ctx, word):
                if candidate.startswith(arg):
                    yield Completion(candidate, start_position=-len(arg))

    def _names(self, word: str) -> Iterable[Completion]:
        for command in self.ctx.registry:
            for name in command.names:
                if f"/{name}".startswith(word.lower()):
                    yield Completion(f"/{name}", start_position=-len(word), display_meta=command.help)

    def _literal(self, text: str) -> Iterable[Completion]:
        for line in self.ctx.registry.literal_lines:
            if text and line.startswith(text):
                yield Completion(line, start_position=-len(text))
