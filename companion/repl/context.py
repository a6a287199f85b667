"""What a slash-command handler works with: the session, the output, the settings and a printer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from companion.audio.playback import AudioOutput
from companion.config import Settings
from companion.repl.registry import Registry
from companion.repl.turns import TurnWorker

if TYPE_CHECKING:
    from companion.repl.talk import Replies
    from companion.session import Session
    from companion.voices import VoiceStore


class Printer(Protocol):
    """How handlers and the worker talk to the user (rich in the REPL layer)."""

    errors_shown: int  # error lines printed so far (lines from stdin: the exit code says there were some)

    def info(self, text: str) -> None: ...
    def success(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None: ...


@dataclass
class Status:
    """What the toolbar shows, refreshed by the worker thread after each job (the UI never asks the session)."""

    voice: str | None = None
    context_used: int | None = None
    context_budget: int | None = None


@dataclass
class ChatContext:
    session: Session
    settings: Settings
    output: AudioOutput
    worker: TurnWorker
    ui: Printer
    voices: VoiceStore
    registry: Registry[ChatContext]
    save_dir: Path
    status: Status = field(default_factory=Status)
    extras: dict[str, Any] = field(default_factory=dict)
    replies: Replies | None = None  # what a typed line becomes (mode speak or chat)

    @property
    def mode(self) -> str:
        return self.replies.mode if self.replies is not None else "speak"

    def voice_names(self) -> list[str]:
        return self.voices.names()
