"""The interactive loop (prompt_toolkit) and the plain loop for lines piped on stdin.

The prompt stays usable while a reply is generated and played: turns run in the TurnWorker and
their reports are printed above the prompt (patch_stdout). Ctrl-C stops the current turn and drops
the queued ones; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from companion.repl.completion import SlashCompleter
from companion.repl.context import ChatContext
from companion.repl.lines import finish, handle_line
from companion.repl.toolbar import toolbar_text

PROMPT = "you› "
STYLE = Style.from_dict({"prompt": "bold ansigreen", "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
                         "bottom-toolbar.sep": "#808080"})


def run_interactive(ctx: ChatContext, history_file: Path) -> int:
    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt: PromptSession[str] = PromptSession(
        history=FileHistory(str(history_file)),
        completer=SlashCompleter(ctx),
        complete_while_typing=True,
        bottom_toolbar=lambda: toolbar_text(ctx),
        refresh_interval=0.2,
        style=STYLE,
    )
    with patch_stdout(raw=True):
        ctx.ui.info("Type to talk, /help for commands, Ctrl-C stops speech, Ctrl-D quits.")
        while True:
            try:
                line = prompt.prompt([("class:prompt", PROMPT)])
            except KeyboardInterrupt:  # stop the current turn (if any) and stay
                ctx.worker.cancel()
                continue
            except EOFError:
                break
            if not handle_line(ctx, line):
                break
        finish(ctx)
    return 0


def run_lines(ctx: ChatContext, lines: Iterable[str]) -> int:
    """stdin is not a terminal: each line is a turn or a command, strictly in order; no prompt_toolkit.
    Exits 1 when any line gave an error (the others were still spoken), so a script can tell."""
    for line in lines:
        if ctx.registry.is_command(line.strip()):
            ctx.worker.wait_idle()  # a script's /stats or /seed comes after the lines before it
        if not handle_line(ctx, line):
            break
    finish(ctx, announce=False)
    return 1 if ctx.ui.errors_shown else 0
