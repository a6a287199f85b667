"""`companion batch`: render a script of lines to numbered WAV files and the whole conversation; or
several scripts, each into a folder of its own, at the same time (companion/commands/batch_render.py).

The output folder is the batch's: manifest.json says which file holds which line and what decided its
audio (companion/session/manifest.py); a rerun renders only what changed or was not finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from companion.commands.batch_render import ScriptWork
from companion.commands.common import add_model_arguments, open_engine, settings_from_args
from companion.errors import CompanionError
from companion.session.manifest import CONVERSATION, MANIFEST, TAKES, LineEntry, Manifest
from companion.textfile import read_text_file

if TYPE_CHECKING:
    from companion.config import Settings
    from companion.session.replay import Take
    from companion.voices import VoiceStore

HELP = "render a script (one line per utterance) to numbered WAV files and the whole conversation"
DESCRIPTION = """Render SCRIPT to DIR: one WAV file per line (001-VOICE.wav, 002-...), conversation.wav and
manifest.json (which file holds which line). Script lines: plain text is spoken by --voice; `name: text`
by the voice `name` (a name that is not a voice is an error; write `\\name: text` to speak it as
written); `a || b` alternates between the voices used so far; `$CLEAR$` forgets the conversation; `#`
starts a comment line. With --paragraphs, lines wrapped by hand are joined and a blank line ends an
utterance. Run it again on the same DIR and only the lines that changed (and those after them) or were
not finished are rendered. The conversation is recorded in the history unless --no-history.

Several scripts (chapters, say): `companion batch one.txt two.txt -o DIR` renders each into a folder of
its own named after the file (DIR/one/, DIR/two/: the same files as above), each its own conversation;
up to engine.max_batch scripts (config.yaml) are rendered at the same time (the others wait for their turn), under
one progress bar for all their lines. Two scripts with the same file name cannot share DIR."""
CONVERSATION_FILE = CONVERSATION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", type=Path, nargs="+",
                        help="the script: a UTF-8 text file, one utterance per line; give several (chapters, say) "
                             "to render each into a folder of its own inside DIR, several at the same time")
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
    from companion.commands.batch_render import check_names, render
    from companion.commands.chat import check_before_loading
    from companion.voices import DEFAULT_VOICE, VoiceStore

    voices = VoiceStore()
    settings = settings_from_args(args, {"voice": args.voice, "generation": {"seed": args.seed}})
    scripts: list[Path] = list(args.script)
    several = len(scripts) > 1
    if several:
        check_names(scripts)
    known = [*voices.names(), DEFAULT_VOICE]
    scripts_lines = [read_script_file(script, known, args.paragraphs) for script in scripts]
    check_before_loading(settings)
    for lines in scripts_lines:
        _check_voices(voices, lines)
    if several:
        _check_parent(args.output, args.force)
    folders = [args.output / script.stem for script in scripts] if several else [args.output]
    works, olds = [], []
    for script, lines, folder in zip(scripts, scripts_lines, folders, strict=True):
        old = _check_output(folder, args.force)
        plan = _plan(lines, settings, voices, script)
        kept, takes = _kept(old, plan, folder) if not args.force else (0, [])
        finished = old is not None and old.complete and len(old.lines) == len(plan) and (folder / CONVERSATION).is_file()
        if kept == len(plan) and finished:
            print(f"nothing to render: all {len(plan)} lines in {folder} are up to date (skipped {len(plan)})")
            continue
        # A resumed run records the whole conversation again (kept lines replayed): it replaces the history
        # entry of the run it finishes, so a Ctrl-C and a rerun leave one conversation, not two.
        replaces = old.history if old is not None and not old.complete and not args.force else None
        works.append(ScriptWork(script, folder, Manifest(str(script), plan), kept, takes, replaces))
        olds.append(old)
    if not works:
        return 0
    for work, old in zip(works, olds, strict=True):
        _forget(old, work.manifest.lines, work.kept, work.folder)
        work.manifest.write(work.folder)
    _warn_if_long([line for w in works for line in w.manifest.lines[w.kept:]])
    with open_engine(settings, min(len(works), settings.engine.max_batch)) as engine:
        return render(engine, settings, voices, works, args)


def _check_parent(directory: Path, force: bool) -> None:
    """The folder that holds several scripts' folders: not one script's own (unless ``force``)."""
    from companion.oserrors import output_folder

    if directory.is_dir() and (directory / MANIFEST).is_file() and not force:
        raise CompanionError(f"{directory}: holds one script's rendering; several scripts are rendered into folders "
                             "of their own inside -o DIR: choose another -o DIR, or pass --force to write into it")
    output_folder(directory, shown=f"-o {directory}")


def _warn_if_long(lines: list[LineEntry]) -> None:
    """One warning before work whose speech alone is estimated at over ``LONG_WORK_SECONDS``."""
    from companion.commands.progress import LONG_WORK_SECONDS, _duration
    from companion.text.segment import estimate_seconds

    speech = sum(estimate_seconds(e.spoken) for e in lines if not e.clear)
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
