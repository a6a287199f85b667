"""`companion batch`: render a script of lines to numbered WAV files and the whole conversation.

The output folder is the batch's: manifest.json says which file holds which line and what decided its
audio (companion/session/manifest.py); a rerun renders only what changed or was not finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from companion.commands.common import add_model_arguments, open_engine, settings_from_args
from companion.errors import CompanionError
from companion.session.manifest import CONVERSATION, MANIFEST, TAKES, LineEntry, Manifest
from companion.textfile import read_text_file

if TYPE_CHECKING:
    from companion.config import Settings
    from companion.engine import Engine
    from companion.session import Session
    from companion.session.replay import Take, Takes
    from companion.voices import VoiceStore

HELP = "render a script (one line per utterance) to numbered WAV files and the whole conversation"
DESCRIPTION = """Render SCRIPT to DIR: one WAV file per line (001-VOICE.wav, 002-...), conversation.wav and
manifest.json (which file holds which line). Script lines: plain text is spoken by --voice; `name: text`
by the voice `name` (a name that is not a voice is an error; write `\\name: text` to speak it as
written); `a || b` alternates between the voices used so far; `$CLEAR$` forgets the conversation; `#`
starts a comment line. With --paragraphs, lines wrapped by hand are joined and a blank line ends an
utterance. Run it again on the same DIR and only the lines that changed (and those after them) or were
not finished are rendered. The conversation is recorded in the history unless --no-history."""
CONVERSATION_FILE = CONVERSATION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", type=Path, help="the script: a UTF-8 text file, one utterance per line")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder for the WAV files")
    parser.add_argument("--voice", help="voice for lines without a `name:` (default: the config's voice)")
    parser.add_argument("--seed", type=int, help="make the rendering reproducible")
    parser.add_argument("--paragraphs", action="store_true",
                        help="join lines wrapped by hand; a blank line separates utterances")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that batch did not make, and render every line again")
    parser.add_argument("--no-history", action="store_true", help="do not record the conversation in the history")
    add_model_arguments(parser)


def read_script_file(path: Path, known: list[str] | None = None, paragraphs: bool = False) -> list[tuple[int, str]]:
    """(line number, utterance) of the script; every mistake in it is found now, before any model work."""
    from companion.session.script import is_clear, script_lines, unknown_prefix
    from companion.text import NOTHING_TO_SAY, prepare

    text = read_text_file(path, "script")
    if "\x00" in text:
        raise CompanionError(f"{path}: script is not a text file (it holds binary data): give a UTF-8 text file")
    lines = script_lines(text, paragraphs)
    if not any(not is_clear(line) for _, line in lines):
        raise CompanionError(f"{path}: the script has no lines to speak: write one utterance per line")
    for number, line in lines:
        if is_clear(line):
            continue
        name = unknown_prefix(line, known) if known is not None else None
        if name is not None:
            raise CompanionError(f"{path}, line {number}: '{name}' is not a voice (voices: {', '.join(known or []) or 'none'}): "
                                 f"fix the name, or write \\{name}: to speak it as written")
        if not prepare(line):  # found now, not after the lines before it were rendered
            raise CompanionError(f"{path}: {line!r}: {NOTHING_TO_SAY}: remove the line or write words")
    return lines


def run(args: argparse.Namespace) -> int:
    from companion.commands.chat import check_before_loading
    from companion.voices import DEFAULT_VOICE, VoiceStore

    voices = VoiceStore()
    settings = settings_from_args(args, {"voice": args.voice, "generation": {"seed": args.seed}})
    lines = read_script_file(args.script, [*voices.names(), DEFAULT_VOICE], args.paragraphs)
    check_before_loading(settings)
    _check_voices(voices, lines)
    old = _check_output(args.output, args.force)
    plan = _plan(lines, settings, voices, args.script)
    kept, takes = _kept(old, plan, args.output) if not args.force else (0, [])
    finished = old is not None and old.complete and len(old.lines) == len(plan) and (args.output / CONVERSATION).is_file()
    if kept == len(plan) and finished:
        print(f"nothing to render: all {len(plan)} lines in {args.output} are up to date (skipped {len(plan)})")
        return 0
    _forget(old, plan, kept, args.output)
    manifest = Manifest(str(args.script), plan)
    manifest.write(args.output)
    # A resumed run records the whole conversation again (kept lines replayed): it replaces the history
    # entry of the run it finishes, so a Ctrl-C and a rerun leave one conversation, not two.
    replaces = old.history if old is not None and not old.complete and not args.force else None
    _warn_if_long(manifest, kept)
    with open_engine(settings) as engine:
        return _render(engine, settings, voices, manifest, kept, takes, args, replaces)


def _warn_if_long(manifest: Manifest, kept: int) -> None:
    """One warning before work whose speech alone is estimated at over ``LONG_WORK_SECONDS``."""
    from companion.commands.progress import LONG_WORK_SECONDS, _duration
    from companion.text.segment import estimate_seconds

    speech = sum(estimate_seconds(e.spoken) for e in manifest.lines[kept:] if not e.clear)
    if speech > LONG_WORK_SECONDS:
        print(f"warning: these lines are about {_duration(speech)} of speech and take a while to render; "
              "Ctrl-C stops it, and the same command later renders the rest", file=sys.stderr)


def _check_voices(voices: VoiceStore, lines: list[tuple[int, str]]) -> None:
    """The voices named in the script can be used (their files are there, they fit the context)."""
    from companion.session.script import parse_line

    names = voices.names()
    for name in dict.fromkeys(p.voice for _, line in lines for p in parse_line(line, names) if p.voice):
        problem = voices.problem(voices.get(name))
        if problem:
            raise CompanionError(problem)


def _check_output(directory: Path, force: bool) -> Manifest | None:
    """The manifest an earlier run left in the folder, or None; a folder batch did not write is refused
    unless ``force`` (then an unreadable manifest is ignored, and a readable one only names files to remove)."""
    if directory.exists() and not directory.is_dir():
        raise CompanionError(f"{directory}: exists and is not a folder: choose another -o DIR")
    if directory.is_dir() and (directory / MANIFEST).is_file():
        try:
            return Manifest.read(directory)  # with --force: only to remove the files it names
        except CompanionError:
            if not force:
                raise
    elif directory.is_dir() and not force:
        if any(directory.iterdir()):
            raise CompanionError(f"{directory}: this folder has files that batch did not write: choose a new or empty "
                                 "-o DIR, or pass --force to write into it")
    from companion.oserrors import output_folder

    output_folder(directory, shown=f"-o {directory}")  # the rule every output follows
    return None


def _plan(lines: list[tuple[int, str]], settings: Settings, voices: VoiceStore, script: Path) -> list[LineEntry]:
    """Every line's entry (not done yet), with the hash of what decides its audio."""
    from companion.session.manifest import line_hash, settings_identity, voice_identity
    from companion.session.script import is_clear, parse_line
    from companion.text import prepare
    from companion.voices import DEFAULT_VOICE

    names = voices.names()
    default = settings.voice or DEFAULT_VOICE
    common = settings_identity(settings)
    identities: dict[str, object] = {}

    def identity(name: str) -> object:
        if name not in identities:
            identities[name] = voice_identity(voices, name)
        return identities[name]

    plan: list[LineEntry] = []
    previous = ""
    for index, (number, line) in enumerate(lines, 1):
        clear = is_clear(line)
        parts = [] if clear else parse_line(line, names)
        spoken = " ".join(seg for p in parts for seg in prepare(p.text, settings.generation.max_segment_seconds))
        used = sorted({default, *(p.voice for p in parts if p.voice)})
        previous = line_hash(previous, {"text": line, "spoken": spoken, "default": default, "settings": common,
                                        "voices": {n: identity(n) for n in used}})
        plan.append(LineEntry(index, number, line, spoken, previous, clear=clear))
    return plan


def _kept(old: Manifest | None, plan: list[LineEntry], folder: Path) -> tuple[int, list[list[Take]]]:
    """How many lines from the first are done with the same hash, and their takes (read now)."""
    from companion.session.manifest import read_take

    if old is None:
        return 0, []
    takes: list[list[Take]] = []
    for entry in old.lines[: old.kept(plan, folder)]:
        if entry.clear:
            takes.append([])
            continue
        try:
            takes.append(read_take(folder / cast(str, entry.take)))
        except CompanionError:  # a damaged take: render from this line on
            break
    for new, entry in zip(plan, old.lines[: len(takes)], strict=False):
        new.done, new.file, new.voice, new.seconds, new.seed, new.take = (
            entry.done, entry.file, entry.voice, entry.seconds, entry.seed, entry.take)
    return len(takes), takes


def _forget(old: Manifest | None, plan: list[LineEntry], kept: int, folder: Path) -> None:
    """Remove the files an earlier run wrote for lines that are rendered again or no longer exist
    (only files its manifest names), and the old conversation.wav."""
    if old is None:
        (folder / CONVERSATION).unlink(missing_ok=True)
        return
    keep = {f for e in plan[:kept] for f in (e.file, e.take) if f}
    for entry in old.lines:
        for name in (entry.file, entry.take):
            if name and name not in keep and _inside(folder, name):
                (folder / name).unlink(missing_ok=True)
    (folder / CONVERSATION).unlink(missing_ok=True)


def _inside(folder: Path, name: str) -> bool:
    return (folder / name).resolve().parent in (folder.resolve(), (folder / TAKES).resolve())


def _render(engine: Engine, settings: Settings, voices: VoiceStore, manifest: Manifest, kept: int,
            takes: list[list[Take]], args: argparse.Namespace, replaces: int | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from companion.session import Session
    from companion.session.replay import Takes
    from companion.store import Store

    store = None if args.no_history else Store()
    recorder = Takes(engine)
    session = Session(cast("Engine", recorder), settings, store, voices)
    if settings.voice:
        session.use_voice(settings.voice)  # an unknown voice fails before any work
    console = Console(file=sys.stderr)
    todo = [e for e in manifest.lines[kept:] if not e.clear]
    if kept:
        console.print(f"skipped {kept} lines already rendered in {args.output} (their recorded takes are replayed)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("rendering", total=len(todo))
            number = 0
            for i, entry in enumerate(manifest.lines):
                if entry.clear:
                    session.clear()
                    entry.done = True
                    continue
                number += 1
                if i < kept:
                    recorder.replay(takes[i])
                    list(session.speak(entry.text))
                else:
                    _render_line(session, recorder, entry, args.output, number)
                if store is not None and session.session_id is not None and manifest.history != session.session_id:
                    manifest.history = session.session_id
                    if replaces is not None:  # the new entry holds every line the old one had, from the first on
                        store.delete_session(replaces)
                        replaces = None
                if i >= kept:
                    manifest.write(args.output)  # after the line's files: the manifest never claims a missing file
                    progress.advance(task)
        _write(args.output / CONVERSATION, session.conversation_audio(), engine.sample_rate)
        manifest.complete = True
        manifest.write(args.output)
    except KeyboardInterrupt:
        done = sum(1 for e in manifest.lines if e.done and not e.clear)
        total = sum(1 for e in manifest.lines if not e.clear)
        print(f"interrupted: {done} of {total} lines are rendered ({args.output / MANIFEST} says which); "
              "run the same command again to render the rest", file=sys.stderr)
        return 130
    finally:
        if store is not None:
            store.close()
        session.close()
    seconds = session.log.seconds
    where = f"; history conversation {session.session_id}" if session.session_id is not None else ""
    skipped = f" (skipped {kept} already rendered)" if kept else ""
    print(f"wrote {len(todo)} lines{skipped} and {CONVERSATION} ({seconds:.1f} s) to {args.output}{where}")
    return 0


def _render_line(session: Session, recorder: Takes, entry: LineEntry, directory: Path, number: int) -> None:
    """Speak one script line; write its audio as NNN-VOICE.wav and its take; fill in its entry."""
    from companion.session.manifest import write_take

    recorder.recorded = []
    chunks = list(session.speak(entry.text))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    voice = "+".join(session.reply_voices) or "none"
    name = f"{number:03d}-{voice}.wav"
    _write(directory / name, audio, session.engine.sample_rate)
    take = f"{TAKES}/{number:03d}.safetensors"
    write_take(directory / take, recorder.recorded)
    first = session.context.voices.get(session.reply_voices[0]) if session.reply_voices else None
    entry.done, entry.file, entry.voice, entry.take = True, name, voice, take
    entry.seconds = round(len(audio) / session.engine.sample_rate, 3)
    entry.seed = session.options(first).seed if first is not None else session.settings.generation.seed


def _write(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    from companion.audio.io import write_wav

    write_wav(path, audio, sample_rate)
