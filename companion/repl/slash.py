"""The built-in slash-commands: the table /help, completion and docs/chat.md are built from.

Commands that change or read the conversation (/clear, /voice, /save) run in the turn worker, after
the turns typed before them, so `hello` then `/save` saves that reply even while it is still speaking.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from companion.audio.io import write_wav
from companion.config import GenerationSettings
from companion.errors import CompanionError
from companion.oserrors import output_file, output_folder, unique_path
from companion.paths import get_paths
from companion.repl.context import ChatContext
from companion.repl.registry import Quit, Registry, SlashCommand
from companion.yamlfile import plain_message

Handler = Callable[[ChatContext, str], None]


def in_turn_order(handler: Handler) -> Handler:
    """Run ``handler`` in the worker, after the turns already queued."""

    def queued(ctx: ChatContext, arg: str) -> None:
        ctx.worker.submit_action(handler.__name__, lambda: handler(ctx, arg))

    queued.__name__ = handler.__name__
    queued.__doc__ = handler.__doc__
    return queued


# ---------------------------------------------------------------- handlers


def show_help(ctx: ChatContext, arg: str) -> None:
    if arg:
        command, _ = ctx.registry.parse("/" + arg.lstrip("/"))
        ctx.ui.table(command.synopsis(), ["", ""], [["help", command.help], ["aliases", ", ".join(command.aliases)]])
        return
    rows = [[syn, aliases, text] for syn, aliases, text in ctx.registry.help_rows()]
    rows.append(["$CLEAR$", "", "typed alone on a line: forget the conversation, keep the voice (same as /clear)"])
    ctx.ui.table("Commands (anything else is spoken)", ["command", "aliases", "what it does"], rows)


def use_voice(ctx: ChatContext, arg: str) -> None:
    if not arg:
        raise CompanionError(f"/voice needs a name: one of {', '.join(ctx.voice_names()) or 'none yet'}")
    ctx.session.use_voice(arg)
    ctx.ui.success(f"voice: {arg}")


def list_voices(ctx: ChatContext, arg: str) -> None:
    current = ctx.status.voice
    rows = [["*" if p.name == current else "", p.name, str(p.speaker), "yes" if p.audio else "no (pinned on first use)",
             p.where()] for p in ctx.voices.list()]
    ctx.ui.table("Voices", ["", "name", "speaker", "reference", "profile"], rows)


def clear(ctx: ChatContext, arg: str) -> None:
    ctx.session.clear()  # the audio context and the text exchanged with the LLM
    ctx.ui.success("context cleared: only the voice reference is kept")


def mode(ctx: ChatContext, arg: str) -> None:
    """/mode [speak|chat]: show or switch what a typed line becomes (after the lines typed before)."""
    from companion.repl.talk import check_mode

    if ctx.replies is None:
        raise CompanionError("/mode is not available here")
    if arg:
        ctx.replies.mode = check_mode(arg.lower())
    ctx.ui.info(ctx.replies.describe())


TRAINED_POSITIONS = 2048  # the context length CSM-1B was trained on


def show_context(ctx: ChatContext, arg: str) -> None:
    rows = [[row.what, str(row.positions), "pinned" if row.pinned else ""] for row in ctx.session.context_report()]
    title = f"Context: {ctx.session.context_used()} of {ctx.session.context_budget()} positions used"
    size = ctx.session.engine.max_seq_len
    if size > TRAINED_POSITIONS:
        title += f" (a memory of {size}: CSM-1B was trained on {TRAINED_POSITIONS})"
    ctx.ui.table(title, ["what", "positions", ""], rows)


def save(ctx: ChatContext, arg: str) -> None:
    words = arg.split()
    whole = "--all" in words
    target = " ".join(w for w in words if w != "--all")
    audio = ctx.session.conversation_audio() if whole else ctx.session.last_reply_audio()
    if audio is None or not len(audio):
        raise CompanionError("nothing to save yet: say something first")
    if target:
        path = output_file(Path(target), "/save")
    else:
        if ctx.save_dir == get_paths().audio_dir:  # companion's own folder (--save-dir was checked at start)
            ctx.save_dir.mkdir(parents=True, exist_ok=True)
        path = unique_path(output_folder(ctx.save_dir), "conversation" if whole else "reply")
    try:
        write_wav(path, np.asarray(audio, dtype=np.float32), 24000)
    except BaseException:
        if not target:
            path.unlink(missing_ok=True)  # the name was reserved empty: leave nothing behind
        raise
    ctx.ui.success(f"saved {len(audio) / 24000:.1f} s to {path}")


def watermark(ctx: ChatContext, arg: str) -> None:
    choice = arg.lower() or "status"
    if choice not in ("on", "off", "status"):
        raise CompanionError(f"/watermark {arg}: expected on, off or status")
    if choice != "status":
        ctx.settings.watermark.enabled = choice == "on"
    state = "on" if ctx.settings.watermark.enabled else "off"
    ctx.ui.info(f"watermark {state} (replies {'are' if state == 'on' else 'are not'} marked as AI-generated)")


def _generation_setter(name: str, parse: Callable[[str], object]) -> Handler:
    """/temperature, /topk, /seed: show the value in use, or set it for the rest of the session."""

    def handler(ctx: ChatContext, arg: str) -> None:
        if arg:
            try:
                value = parse(arg)
                GenerationSettings.model_validate({name: value})  # the config's limits
            except (ValueError, ValidationError) as err:
                raise CompanionError(f"/{name} {arg}: {_first_error(err, name)}") from None
            ctx.session.overrides[name] = value
        voice = ctx.session.voice
        current = getattr(ctx.session.options(voice), name) if voice else ctx.session.overrides.get(
            name, getattr(ctx.settings.generation, name))
        ctx.ui.info(f"{name}: {'random' if current is None else current}")

    handler.__name__ = name
    return handler


def _first_error(err: Exception, name: str) -> str:
    if isinstance(err, ValidationError):
        return plain_message(err.errors()[0], "must be")
    return {"seed": "must be a whole number (or off)", "topk": "must be a whole number"}.get(name, "must be a number")


def _seed(text: str) -> int | None:
    return None if text.lower() in ("off", "none", "random") else int(text)


def stats(ctx: ChatContext, arg: str) -> None:
    turns = ctx.worker.history
    last = turns[-1] if turns else None
    rtfs = [t.rtf for t in turns if t.rtf is not None]
    rows = [
        ["turns spoken", str(len(turns))],
        ["first audio (last turn)", _seconds(last.first_chunk_s if last else None)],
        ["first sound (last turn)", _seconds(last.first_sound_s if last else None)],
        *_reply_rows(turns),
        ["RTF (mean, generation s / audio s)", f"{sum(rtfs) / len(rtfs):.3f}" if rtfs else "-"],
        ["audio generated", f"{sum(t.audio_s for t in turns):.1f} s"],
        ["underruns", str(ctx.output.underruns)],
        ["output", ctx.output.describe()],
    ]
    ctx.ui.table("Stats", ["", ""], rows)


def _reply_rows(turns: list) -> list[list[str]]:
    """The last LLM reply's latency: its first sentence, then that sentence's first audio (chat mode)."""
    timing = next((t.reply for t in reversed(turns) if t.reply is not None), None)
    if timing is None:
        return []
    return [
        ["LLM first sentence (last reply)", _seconds(timing.first_sentence_s)],
        ["first sentence -> first audio (last reply)", _seconds(timing.sentence_to_audio_s)],
        ["engine first audio (last reply)", _seconds(timing.engine_first_audio_s)],
    ]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def quit_(ctx: ChatContext, arg: str) -> None:
    raise Quit


# ---------------------------------------------------------------- the table


def _voices(ctx: ChatContext) -> list[str]:
    return ctx.voice_names()


def _command_names(ctx: ChatContext) -> list[str]:
    return [c.name for c in ctx.registry]


def build_registry() -> Registry[ChatContext]:
    reg: Registry[ChatContext] = Registry(literal_lines={"$CLEAR$": "clear"})
    for command in [
        SlashCommand("help", "show the commands, or one command's help", show_help, ("h", "?"), "[COMMAND]",
                     _command_names),
        SlashCommand("voice", "speak with another voice from now on", in_turn_order(use_voice), (), "NAME", _voices),
        SlashCommand("voices", "list the voice profiles", list_voices),
        SlashCommand("clear", "forget the conversation, keep the voice (same as $CLEAR$)", in_turn_order(clear),
                     ("reset",)),
        SlashCommand("mode", "show or switch the mode: speak what you type, or chat with the LLM",
                     in_turn_order(mode), (), "[speak|chat]", lambda ctx: ["speak", "chat"]),
        SlashCommand("context", "what is in memory and what it costs, in positions", in_turn_order(show_context),
                     ("ctx",)),
        SlashCommand("save", "write the last reply (or --all: the conversation) to a WAV file", in_turn_order(save),
                     (), "[FILE.wav] [--all]", lambda ctx: ["--all"]),
        SlashCommand("watermark", "turn the AI-audio watermark on or off, or show it", watermark, ("wm",),
                     "on|off|status", lambda ctx: ["on", "off", "status"]),
        SlashCommand("temperature", "show or set the sampling temperature (0 = greedy)",
                     _generation_setter("temperature", float), ("temp",), "[VALUE]"),
        SlashCommand("topk", "show or set top-k sampling", _generation_setter("topk", int), (), "[N]"),
        SlashCommand("seed", "show or set the random seed (off: random)", _generation_setter("seed", _seed), (),
                     "[N|off]", lambda ctx: ["off"]),
        SlashCommand("stats", "latency, real-time factor and underruns so far", stats),
        SlashCommand("quit", "leave (Ctrl-D does the same)", quit_, ("exit", "q")),
    ]:
        reg.add(command)
    return reg
