"""Acceptance 5: every registered slash-command has help text and appears in /help and in completion."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from rich.console import Console

from companion.config import Settings
from companion.errors import CompanionError
from companion.repl.completion import SlashCompleter
from companion.repl.console import RichPrinter
from companion.repl.context import ChatContext
from companion.repl.registry import Registry, SlashCommand
from companion.repl.slash import build_registry
from companion.voices import VoiceProfile, VoiceStore


def make_context(buffer: io.StringIO) -> ChatContext:
    """The real registry, printer and voice store; /help and completion need nothing else."""
    console = Console(file=buffer, width=200, highlight=False, color_system=None)
    return ChatContext(session=None, settings=Settings(), output=None, worker=None,  # type: ignore[arg-type]
                       ui=RichPrinter(console), voices=VoiceStore(), registry=build_registry(), save_dir=Path("."))


def completions(ctx: ChatContext, text: str) -> list[str]:
    return [c.text for c in SlashCompleter(ctx).get_completions(Document(text), CompleteEvent())]


REQUIRED = ["help", "voice", "voices", "clear", "context", "save", "watermark", "temperature", "topk", "seed",
            "stats", "quit"]


def test_the_issue_commands_are_registered():
    names = {c.name for c in build_registry()}
    assert set(REQUIRED) <= names, set(REQUIRED) - names


@pytest.mark.parametrize("command", list(build_registry()), ids=lambda c: c.name)
def test_every_command_has_help_and_is_in_help_and_completion(command: SlashCommand[ChatContext]):
    assert command.help.strip() and "\n" not in command.help and len(command.help) < 90
    assert command.help[0].islower(), "help lines start in lower case, like the rest of the CLI"

    buffer = io.StringIO()
    ctx = make_context(buffer)
    ctx.registry.dispatch(ctx, "/help")
    shown = buffer.getvalue()
    assert command.synopsis() in shown and command.help in shown
    for alias in command.aliases:
        assert f"/{alias}" in shown

    offered = completions(ctx, "/")
    assert all(f"/{n}" in offered for n in command.names)
    assert f"/{command.name}" in completions(ctx, f"/{command.name[:2]}")


def test_help_for_one_command_and_for_an_unknown_one():
    buffer = io.StringIO()
    ctx = make_context(buffer)
    ctx.registry.dispatch(ctx, "/help save")
    assert "write the last reply" in buffer.getvalue()
    with pytest.raises(CompanionError, match=r"unknown command /sve: did you mean /save\?"):
        ctx.registry.dispatch(ctx, "/help sve")


@pytest.mark.parametrize(("typed", "suggestion"), [("/voise", "/voice"), ("/contxt", "/context"),
                                                   ("/qiut", "/quit"), ("/temprature", "/temperature")])
def test_unknown_command_suggests_the_nearest(typed: str, suggestion: str):
    reg = build_registry()
    with pytest.raises(CompanionError) as err:
        reg.parse(typed)
    assert str(err.value) == f"unknown command {typed}: did you mean {suggestion}?"


def test_unknown_command_without_a_near_one_points_to_help():
    with pytest.raises(CompanionError, match=r"unknown command /xyzzy: type /help for the list"):
        build_registry().parse("/xyzzy")


def test_clear_line_is_the_clear_command():
    reg = build_registry()
    assert reg.is_command("$CLEAR$") and not reg.is_command("hello $CLEAR$")
    command, arg = reg.parse("$CLEAR$")
    assert command.name == "clear" and arg == ""


def test_argument_completion_offers_voice_names_and_choices():
    store = VoiceStore()
    store.add(VoiceProfile(name="guest"))
    ctx = make_context(io.StringIO())
    assert completions(ctx, "/voice ") == ["guest", "narrator"]  # the user's and the shipped example
    assert completions(ctx, "/voice g") == ["guest"]
    assert completions(ctx, "/watermark o") == ["on", "off"]
    assert completions(ctx, "/save ") == ["--all"]
    assert completions(ctx, "$CL") == ["$CLEAR$"]
    assert completions(ctx, "hello") == []


def test_names_and_aliases_are_unique():
    reg: Registry[None] = Registry()
    reg.add(SlashCommand("one", "first", lambda ctx, arg: None, ("o",)))
    with pytest.raises(ValueError, match="already registered"):
        reg.add(SlashCommand("other", "second", lambda ctx, arg: None, ("o",)))


def test_the_docs_table_is_the_registry():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "chat.md").read_text(encoding="utf-8")
    assert build_registry().markdown() in docs, "docs/chat.md: paste build_registry().markdown() again"


@pytest.mark.parametrize(("max_seq_len", "noted"), [(4096, True), (2048, False)])
def test_context_mentions_the_trained_length_only_beyond_it(tiny_engine, max_seq_len: int, noted: bool) -> None:
    from companion.engine import Engine
    from companion.repl.slash import show_context
    from companion.session import Session

    engine = Engine(tiny_engine.model, tiny_engine.processor, "ctx", max_seq_len=max_seq_len)
    buffer = io.StringIO()
    ctx = make_context(buffer)
    ctx.session = Session(engine, Settings(), None, VoiceStore())
    show_context(ctx, "")  # what /context runs on the turn worker
    shown = buffer.getvalue()
    assert "positions used" in shown
    assert ("CSM-1B was trained on 2048" in shown) == noted
