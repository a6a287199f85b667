"""What a typed line becomes: spoken as typed (mode ``speak``) or answered by the LLM (mode ``chat``).

In chat mode the reply streams through ``companion.talkback``: its text is shown as it arrives and
each sentence is spoken as soon as it is complete. The system prompt is the active voice's
``persona`` when its profile has one, else ``llm.system_prompt``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from companion.config import Settings
from companion.errors import CompanionError

if TYPE_CHECKING:
    from companion.session import Session
    from companion.talkback import TalkBack

MODES = ("speak", "chat")
REPLY_SECONDS_GUESS = 12.0  # an LLM reply's expected length, for the player's prebuffer (a few sentences)


class Replies:
    def __init__(self, session: Session, settings: Settings, mode: str | None = None,
                 on_text: Callable[[str], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        self.session = session
        self.settings = settings
        self.mode = check_mode(mode or ("chat" if settings.llm.enabled else "speak"))
        self._on_text, self._on_end = on_text, on_end
        self._talk: TalkBack | None = None

    def __call__(self, text: str, cancel: threading.Event) -> Iterator[np.ndarray]:
        """The audio for one typed line, in the current mode (the turn worker calls this)."""
        if self.mode == "speak":
            return self.session.speak(text, cancel=cancel)
        return self.talkback().reply(text, cancel)

    def talkback(self) -> TalkBack:
        if self._talk is None:
            from companion.llm import LLMClient
            from companion.talkback import TalkBack

            self._talk = TalkBack(self.session, LLMClient(self.settings.llm), self.system_prompt,
                                  on_text=self._on_text, on_end=self._on_end)
        return self._talk

    def system_prompt(self) -> str | None:
        voice = self.session.voice
        persona = getattr(voice.profile, "persona", None) if voice is not None else None
        return persona or self.settings.llm.system_prompt or None

    def expected_seconds(self, text: str, estimate: Callable[[str], float]) -> float:
        """How long the reply to ``text`` is expected to last (the player's prebuffer uses it)."""
        return estimate(text) if self.mode == "speak" else REPLY_SECONDS_GUESS

    @property
    def interrupts(self) -> bool:
        """A line typed while a reply is spoken stops it (chat mode, ``llm.new_line: interrupt``)."""
        return self.mode == "chat" and self.settings.llm.new_line == "interrupt"

    def describe(self) -> str:
        if self.mode == "speak":
            return "mode speak: what you type is spoken"
        llm = self.settings.llm
        return f"mode chat: {llm.model} at {llm.base_url} answers, and its reply is spoken"


def check_mode(mode: str) -> str:
    """``mode`` when it can be used: chat mode needs the llm extra, and is refused now when it is missing."""
    if mode not in MODES:
        raise CompanionError(f"unknown mode '{mode}': use speak (what you type is spoken) or chat (the LLM answers)")
    if mode == "chat":
        from companion.llm import check_installed

        check_installed()
    return mode
