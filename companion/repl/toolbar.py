"""The bottom toolbar: mode (speak or chat), voice, context used / budget, output device, watermark, what is happening."""

from __future__ import annotations

from prompt_toolkit.formatted_text import FormattedText

from companion.repl.context import ChatContext

SEP = ("class:bottom-toolbar.sep", " │ ")


def toolbar_text(ctx: ChatContext) -> FormattedText:
    st = ctx.status
    used = "?" if st.context_used is None else str(st.context_used)
    budget = "?" if st.context_budget is None else str(st.context_budget)
    parts: list[tuple[str, str]] = [
        ("", f" {ctx.mode}"),
        SEP,
        ("", f"voice {st.voice or '-'}"),
        SEP,
        ("", f"context {used}/{budget}"),
        SEP,
        ("", f"out {_short(ctx.output.describe())}"),
        SEP,
        ("", f"watermark {'on' if ctx.settings.watermark.enabled else 'off'}"),
        SEP,
        *_activity(ctx),
    ]
    return FormattedText(parts)


def _activity(ctx: ChatContext) -> list[tuple[str, str]]:
    state = ctx.worker.state
    queued = f" (+{ctx.worker.pending} queued)" if ctx.worker.pending else ""
    if state == "generating":
        return [("bold", f"● generating{queued}"), ("", "  Ctrl-C stops")]
    if state == "playing":
        return [("bold", f"▶ playing{queued}"), ("", "  Ctrl-C stops")]
    return [("", "idle  /help · Ctrl-D quits")]


def _short(text: str, width: int = 24) -> str:
    """Long device names and folders keep their end, which tells them apart."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]
