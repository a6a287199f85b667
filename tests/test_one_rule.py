"""One rule per question (issue 19, acceptance 3): each rule runs across every command that has it.

Commands run through the real entry point (``companion.cli.main``) in a fresh COMPANION_HOME and
folder; the model they name does not exist, so an answer about the input proves it was checked first.
The rules are written down in docs/errors.md ("The user's own machine, and one rule per question").
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from companion.cli import main
from companion.errors import CompanionError
from companion.text import NOTHING_TO_SAY, NothingToSay, speakable

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
NO_MODEL = ["--model", "no-model-here"]


def answer(argv: list[str]) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of one command."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copy(DATA / "guest.mp3", folder / "speech.mp3")
    (folder / "lines.txt").write_text("Hello there.\n", encoding="utf-8")
    monkeypatch.chdir(folder)
    return folder


# ---- output folders are created when their parent exists, everywhere ----------------------------

# Every command with an output, writing into the folder OUT (a placeholder for the path tried).
OUTPUTS = {
    "say -o": ["say", "Hello.", "-o", "OUT/x.wav", *NO_MODEL],
    "batch -o": ["batch", "lines.txt", "-o", "OUT", *NO_MODEL],
    "chat --save-dir": ["chat", "--save-dir", "OUT", *NO_MODEL],
    "history export": ["history", "export", "1", "OUT/x.wav", *NO_MODEL],
    "watermark embed": ["watermark", "embed", "speech.mp3", "OUT/x.wav"],
}


def _with(argv: list[str], out: str) -> list[str]:
    return [a.replace("OUT", out) for a in argv]


@pytest.mark.parametrize("command", OUTPUTS)
def test_a_missing_output_folder_is_created_when_its_parent_exists(command: str, work: Path) -> None:
    code, lines = answer(_with(OUTPUTS[command], "new"))
    assert (work / "new").is_dir()
    assert not any("does not exist" in ln and "folder" in ln for ln in lines)  # what stopped it, if anything, came later
    assert not any("unexpected" in ln for ln in lines)


@pytest.mark.parametrize("command", OUTPUTS)
def test_a_missing_output_folder_whose_parent_is_missing_is_refused(command: str, work: Path) -> None:
    code, lines = answer(_with(OUTPUTS[command], "a/b"))
    assert code == 2 and len(lines) == 1
    assert lines[0].endswith("folder a/b does not exist: create it first or write somewhere else")
    assert not (work / "a").exists()


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_unreplaced_variable_is_refused_not_made_into_a_folder(command: str, work: Path) -> None:
    code, lines = answer(_with(OUTPUTS[command], "$HOME"))
    assert code == 2 and lines == [lines[0]] and "$HOME was not replaced by its value" in lines[0]
    assert not (work / "$HOME").exists()


class Recorder:
    errors_shown = 0

    def __init__(self) -> None:
        self.lines: list[str] = []

    def success(self, text: str) -> None:
        self.lines.append(text)


def _save_in_chat(arg: str, save_dir: Path) -> list[str]:
    """/save ARG through the real handler, with a conversation of 0.2 s."""
    from companion.repl.slash import save

    audio = np.full(4800, 0.25, dtype=np.float32)
    session = SimpleNamespace(conversation_audio=lambda: audio, last_reply_audio=lambda: audio)
    ui = Recorder()
    save(SimpleNamespace(session=session, ui=ui, save_dir=save_dir), arg)  # type: ignore[arg-type]
    return ui.lines


def test_save_in_chat_follows_the_same_folder_rule(work: Path) -> None:
    assert _save_in_chat("new/x.wav", work) == ["saved 0.2 s to new/x.wav"]
    assert (work / "new" / "x.wav").is_file()
    for target, words in [("a/b/x.wav", "folder a/b does not exist"), ("$HOME/x.wav", "$HOME was not replaced")]:
        with pytest.raises(CompanionError) as refused:
            _save_in_chat(target, work)
        assert words in str(refused.value)
    assert not (work / "a").exists() and not (work / "$HOME").exists()


# ---- text with nothing to speak is refused the same way -------------------------------------------

NOTHING = ["😀🎉🔥", "\x1b[31m\x07", "★ ☆ ✓", "— … —", "\u200b\u200d"]


@pytest.mark.parametrize("text", NOTHING)
def test_the_rule_itself(text: str) -> None:
    with pytest.raises(NothingToSay) as refused:
        speakable(text)
    assert str(refused.value) == NOTHING_TO_SAY
    for blank in ["", "   ", "\n\t"]:
        with pytest.raises(NothingToSay):
            speakable(blank)
    assert speakable("Hi 😀") == ["Hi."]


@pytest.mark.parametrize("text", NOTHING)
def test_say_batch_and_voice_add_refuse_it_in_the_same_words(text: str, work: Path) -> None:
    (work / "script.txt").write_text(f"Hello.\n{text}\n", encoding="utf-8")
    (work / "transcript.txt").write_text(text + "\n", encoding="utf-8")
    for argv in (["say", text, *NO_MODEL],
                 ["batch", "script.txt", "-o", "out", *NO_MODEL],
                 ["voice", "add", "x", "--audio", "speech.mp3", "--transcript", text],
                 ["voice", "add", "x", "--audio", "speech.mp3", "--transcript-file", "transcript.txt"]):
        code, lines = answer(argv)
        assert code != 0 and len(lines) == 1 and NOTHING_TO_SAY in lines[0], (argv, lines)


def test_chat_refuses_it_in_the_same_words(tiny_engine) -> None:
    """A chat line reaches Session.speak, which calls the same rule before any voice or model work."""
    from companion.config import load_settings
    from companion.session import Session
    from companion.voices import VoiceStore

    session = Session(tiny_engine, load_settings(), None, VoiceStore())
    for text in NOTHING:
        with pytest.raises(NothingToSay) as refused:
            session.speak(text)
        assert str(refused.value) == NOTHING_TO_SAY
    assert list(session.stats) == []


# ---- range errors are one line, as typed-argument errors are --------------------------------------

RANGES = [
    (["say", "Hello.", "--threads", "0", *NO_MODEL], "error: --threads 0: must be greater than or equal to 1"),
    (["say", "Hello.", "--threads", "9999", *NO_MODEL], "error: --threads 9999: must be less than or equal to 1024"),
    (["chat", "--threads", "2000", *NO_MODEL], "error: --threads 2000: must be less than or equal to 1024"),
    (["batch", "lines.txt", "-o", "out", "--seed", "-5", *NO_MODEL],
     "error: --seed -5: must be greater than or equal to 0"),
    (["bench", "--threads", "4096", *NO_MODEL], "error: --threads 4096: must be less than or equal to 1024"),
    (["serve", "--threads", "0", *NO_MODEL], "error: --threads 0: must be greater than or equal to 1"),
    (["voice", "add", "x", "--audio", "speech.mp3", "--transcript", "Hi", "--seed", "-1"],
     "error: --seed -1: must be greater than or equal to 0"),
    (["voice", "add", "x", "--audio", "speech.mp3", "--transcript", "Hi", "--topk", "0"],
     "error: --topk 0: must be greater than or equal to 1"),
]


@pytest.mark.parametrize(("argv", "line"), RANGES, ids=[" ".join(a[:4]) for a, _ in RANGES])
def test_a_value_out_of_range_is_one_line(argv: list[str], line: str, work: Path) -> None:
    code, lines = answer(argv)
    assert (code, lines) == (2, [line])


def test_wrong_types_are_said_in_the_users_words(work: Path, companion_home: Path) -> None:
    config = companion_home / "config" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    for text, words in [("generation: 5\n", "key 'generation' (line 1): should be a group of keys"),
                        ("engine:\n  threads: abc\n", "key 'engine.threads' (line 2): should be a whole number"),
                        ("engine:\n  threads: abc\ngeneration:\n  temperature: hot\n",
                         "(and 1 more problem in this file)")]:
        config.write_text(text)
        code, lines = answer(["say", "Hello.", *NO_MODEL])
        assert code == 1 and len(lines) == 1 and words in lines[0], lines
        assert not re.search(r"instance of|invalid literal|problem\(s\)|Input should", lines[0])


def test_chat_setting_commands_say_it_in_the_users_words() -> None:
    from companion.repl.slash import build_registry

    registry = build_registry()
    session = SimpleNamespace(overrides={}, voice=None)
    ctx = SimpleNamespace(session=session, settings=SimpleNamespace(generation=SimpleNamespace(seed=None)))
    for command, arg, message in [("seed", "abc", "/seed abc: must be a whole number (or off)"),
                                  ("topk", "1.5", "/topk 1.5: must be a whole number"),
                                  ("temperature", "warm", "/temperature warm: must be a number"),
                                  ("topk", "0", "/topk 0: must be greater than or equal to 1")]:
        with pytest.raises(CompanionError) as refused:
            registry.dispatch(ctx, f"/{command} {arg}")  # type: ignore[arg-type]
        assert str(refused.value) == message


# ---- saved files never overwrite each other silently ----------------------------------------------

def test_two_chats_saving_in_the_same_second_write_two_files(tmp_path: Path) -> None:
    """Two chats (two WavWriters on one folder) and a third through /save, all at once."""
    from companion.audio.playback import WavWriter

    writers = [WavWriter(tmp_path), WavWriter(tmp_path)]
    levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    start = threading.Barrier(len(levels))

    def reply(writer: WavWriter, level: float) -> None:
        start.wait()
        writer.play([np.full(2400, level, np.float32)])

    threads = [threading.Thread(target=reply, args=(writers[i % 2], lv)) for i, lv in enumerate(levels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(tmp_path.glob("reply-*.wav"))
    assert len(files) == len(levels)
    heard = sorted(round(float(sf.read(str(f), dtype="float32")[0][0]), 1) for f in files)
    assert heard == levels  # every reply is there, none written over another
    saved = [_save_in_chat("", tmp_path)[0] for _ in range(3)]
    assert len(set(saved)) == 3 and len(list(tmp_path.glob("reply-*.wav"))) == len(levels) + 3  # /save: the last reply


# ---- a feature whose extra is missing is refused when it is chosen --------------------------------

def test_chat_mode_without_the_llm_extra_is_refused_before_the_model(tmp_path: Path, companion_home: Path) -> None:
    """The package is made unimportable in the child (as when the extra is not installed)."""
    code = ("import sys; sys.modules['openai'] = None; from companion.cli import main; "
            "sys.exit(main(['chat', '--mode', 'chat', '--model', 'no-model-here']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         input="Hello.\n")
    assert out.returncode == 1
    assert out.stderr.strip() == "error: replies from an LLM need the openai package: pip install 'companion[llm]'"
    code = code.replace("['chat', '--mode', 'chat', ", "['chat', ")
    config = companion_home / "config" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("llm:\n  enabled: true\n")  # chosen in the config: the same answer
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         input="Hello.\n")
    assert out.stderr.strip() == "error: replies from an LLM need the openai package: pip install 'companion[llm]'"
