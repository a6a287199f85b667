"""Small first-hour edges: plain `companion history` / `companion voice`, /help's $CLEAR$ line, `/save FILE --all`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from companion.cli import main
from companion.repl.slash import build_registry, save, show_help


class Recorder:
    """A Printer that keeps what it was given (the handlers under test are the real ones)."""

    errors_shown = 0

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tables: list[tuple[str, list[list[str]]]] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    success = warn = error = info

    def table(self, title: str, columns: object, rows: list[list[str]]) -> None:
        self.tables.append((title, [list(r) for r in rows]))


def test_plain_history_and_voice_show_a_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history"]) == 0
    assert capsys.readouterr().out.strip() == "no conversations yet: start one with `companion chat`"
    assert main(["voice"]) == 0
    listing = capsys.readouterr().out
    assert "narrator" in listing and "example" in listing


def test_help_says_what_clear_does() -> None:
    ui = Recorder()
    show_help(SimpleNamespace(registry=build_registry(), ui=ui), "")  # type: ignore[arg-type]
    rows = {row[0]: row[2] for row in ui.tables[0][1]}
    assert rows["$CLEAR$"] == "typed alone on a line: forget the conversation, keep the voice (same as /clear)"
    assert "seed" not in rows["$CLEAR$"]


@pytest.mark.parametrize("arg", ["talk.wav --all", "--all talk.wav"])
def test_save_all_takes_the_file_name_in_either_order(arg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    conversation, last = np.full(4800, 0.25, dtype=np.float32), np.full(2400, -0.5, dtype=np.float32)
    session = SimpleNamespace(conversation_audio=lambda: conversation, last_reply_audio=lambda: last)
    ui = Recorder()
    save(SimpleNamespace(session=session, ui=ui, save_dir=tmp_path / "unused"), arg)  # type: ignore[arg-type]
    audio, rate = sf.read(str(tmp_path / "talk.wav"), dtype="float32")
    assert rate == 24000 and len(audio) == 4800 and np.allclose(audio, 0.25, atol=1e-4)  # the whole conversation
    assert ui.lines == ["saved 0.2 s to talk.wav"]


def test_chat_refuses_nothing_to_say_before_loading_a_voice(tiny_engine) -> None:
    """In chat the line reaches Session.speak: it is refused there, before the voice is prepared or any frame."""
    from companion.config import load_settings
    from companion.errors import CompanionError
    from companion.session import Session
    from companion.text import NOTHING_TO_SAY
    from companion.voices import VoiceStore

    session = Session(tiny_engine, load_settings(), None, VoiceStore())
    for line in ["😀🎉🔥", "\x1b[31m\x07", "narrator: 🎉"]:
        with pytest.raises(CompanionError) as refused:
            session.speak(line)
        assert str(refused.value) == NOTHING_TO_SAY
    assert session.context.voices == {} and session.active is None and list(session.stats) == []
