"""What one typed line does, for the REPL and for lines read from stdin alike."""

from __future__ import annotations

from companion.errors import CompanionError
from companion.oserrors import describe
from companion.repl.context import ChatContext
from companion.repl.registry import Quit


def handle_line(ctx: ChatContext, line: str) -> bool:
    """Run a slash-command or queue the text to be spoken. False when the user asked to quit."""
    line = line.strip()
    if not line:
        return True
    if not ctx.registry.is_command(line):
        if ctx.replies is not None and ctx.replies.interrupts and ctx.worker.busy:
            ctx.worker.cancel()  # llm.new_line: interrupt: the new line stops the reply being spoken
        ctx.worker.submit(line)
        return True
    try:
        ctx.registry.dispatch(ctx, line)
    except Quit:
        return False
    except CompanionError as err:  # one line; the REPL and its context go on
        ctx.ui.error(str(err))
    except OSError as err:  # the user's machine (/save onto a full disk): the same line the commands give
        ctx.ui.error(describe(err))
    return True


def finish(ctx: ChatContext, *, announce: bool = True) -> None:
    """Let queued turns finish (Ctrl-C stops them), then stop the worker."""
    try:
        if announce and ctx.worker.busy:
            ctx.ui.info(f"finishing {ctx.worker.remaining} queued item(s): Ctrl-C to stop now")
        ctx.worker.wait_idle()
    except KeyboardInterrupt:
        ctx.worker.cancel()
    ctx.worker.close()
