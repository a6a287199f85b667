"""`companion voice`: manage voice profiles: add, list, show, remove."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from companion.audio.prepare import RECOMMENDED_LENGTH
from companion.commands.common import add_model_arguments, settings_from_args
from companion.errors import CompanionError, UsageError
from companion.paths import get_paths
from companion.voices import GenerationOverrides, VoiceProfile, VoiceStore, read_transcript

if TYPE_CHECKING:
    from companion.audio.prepare import PreparationReport
from companion.yamlfile import describe_validation_error

HELP = "manage voice profiles: add, list, show, remove"
DESCRIPTION = (
    "Manage voice profiles (one YAML file per voice in your data folder; examples ship in config/voices). "
    f"A voice is {RECOMMENDED_LENGTH} of clean speech of one speaker plus its transcript. Without ACTION: list."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")  # none: list
    add = sub.add_parser("add", help="add a voice from reference audio and its transcript (checks the audio first)")
    add.add_argument("name", help="voice name (letters, digits, '-' and '_')")
    add.add_argument("--audio", action="append", required=True, metavar="FILE",
                     help="reference recording (WAV, MP3, FLAC, OGG); repeat for several files of the same speaker")
    add.add_argument("--transcript", metavar="TEXT", help="the words spoken in the audio")
    add.add_argument("--transcript-file", metavar="FILE", help="a UTF-8 text file with the words spoken in the audio")
    add.add_argument("--speaker", type=int, default=0, metavar="N", help="CSM speaker id for this voice (default 0)")
    add.add_argument("--temperature", type=float, help="this voice's sampling temperature (default: config)")
    add.add_argument("--topk", type=int, help="this voice's top-k (default: config)")
    add.add_argument("--seed", type=int, help="this voice's random seed (default: config)")
    add.add_argument("--force", action="store_true", help="replace an existing voice of the same name")
    sub.add_parser("list", help="list the voices (yours and the shipped examples)")
    show = sub.add_parser("show", help="show a voice's profile and what preparing its audio does")
    show.add_argument("name")
    encode = sub.add_parser(
        "encode", help="encode a voice's reference with the model now and cache the codes (sessions then start fast)"
    )
    encode.add_argument("name")
    add_model_arguments(encode)
    remove = sub.add_parser("remove", help="delete one of your voice profiles (the audio files are kept)")
    remove.add_argument("name")


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    actions = {"add": _add, "list": _list, "show": _show, "encode": _encode, "remove": _remove}
    return actions[args.action or "list"](args, console)


def _add(args: argparse.Namespace, console: Console) -> int:
    store = VoiceStore()
    profile = _profile_from_args(args)
    if not args.force and (profile.name in store.names() or any(b.name == profile.name for b in store.broken())):
        store.add(profile)  # raises the "already exists" error before the audio is prepared
    from companion.audio.prepare import prepare_references
    from companion.refbudget import reference_cost
    from companion.refcheck import check_transcript

    settings = settings_from_args(args)
    prepared = prepare_references(profile.audio_paths(), settings.reference)
    transcript = profile.transcript_text() or ""
    check = check_transcript(transcript, sum(r.speech_seconds for r in prepared.reports))
    cost = reference_cost(settings, len(prepared.samples), transcript, profile.speaker)
    refusal = check.refusal(profile.name) or (None if cost.fits else cost.refusal(profile.name))
    if refusal:  # it could never be used: say so now, not at the first reply
        _print_reports(console, prepared.reports, prepared.seconds)
        raise CompanionError(refusal)
    for warning in check.warnings(profile.name):
        print(f"warning: {warning}", file=sys.stderr)
    path = store.add(profile, force=args.force)
    console.print(f"added voice '{profile.name}' -> {path}")
    _print_reports(console, prepared.reports, prepared.seconds)
    console.print(cost.summary())
    return 0


def _profile_from_args(args: argparse.Namespace) -> VoiceProfile:
    if args.transcript is not None and args.transcript_file is not None:
        raise UsageError("give either --transcript or --transcript-file, not both")
    if args.transcript is None and args.transcript_file is None:
        raise UsageError("transcript missing: pass --transcript TEXT or --transcript-file FILE (the words spoken in the audio)")
    if args.transcript is not None and not args.transcript.strip():
        raise UsageError("--transcript is empty: give the words spoken in the audio")
    transcript_file = None
    if args.transcript_file is not None:
        path = Path(args.transcript_file).expanduser().resolve()
        _words_to_speak(read_transcript(path), str(args.transcript_file))
        transcript_file = _reference(path)
    else:
        _words_to_speak(args.transcript, f"--transcript {args.transcript!r}")
    try:
        overrides = GenerationOverrides(temperature=args.temperature, topk=args.topk, seed=args.seed)
        return VoiceProfile(
            name=args.name,
            audio=[_reference(Path(a).expanduser().resolve()) for a in args.audio],
            transcript=args.transcript.strip() if args.transcript is not None else None,
            transcript_file=transcript_file,
            speaker=args.speaker,
            generation=overrides,
        )
    except ValidationError as err:
        raise UsageError(_flag_error(args, err)) from None


def _words_to_speak(transcript: str, where: str) -> None:
    """A transcript with nothing to speak is refused by the rule `say`, `chat`, `batch` and `serve` use."""
    from companion.text import NothingToSay, speakable

    try:
        speakable(transcript)
    except NothingToSay as err:
        raise NothingToSay(f"{where}: {err}") from None


def _flag_error(args: argparse.Namespace, err: ValidationError) -> str:
    """One line naming the flag and its value: ``--temperature -1.0: must be greater than or equal to 0``."""
    from companion.commands.common import flag_error

    first = err.errors()[0]
    key = str(first["loc"][-1]) if first["loc"] else ""
    if key in ("temperature", "topk", "seed", "speaker"):
        return flag_error(err, args)
    return describe_validation_error("companion voice add", err)


def _reference(path: Path) -> str:
    """How a profile refers to ``path``: relative when it is in clone_files, else absolute."""
    clone_dir = get_paths().clone_dir.resolve()
    return str(path.relative_to(clone_dir)) if path.is_relative_to(clone_dir) else str(path)


def _list(args: argparse.Namespace, console: Console) -> int:
    store = VoiceStore()
    profiles, broken = store.list(), store.broken()
    if not profiles and not broken:
        console.print("no voices yet: add one with `companion voice add NAME --audio FILE --transcript-file FILE`")
        return 0
    table = Table("name", "speaker", "audio", "transcript", "profile", "state")
    problems: list[str] = []
    for p in profiles:
        transcript = p.transcript if p.transcript is not None else (f"file: {Path(p.transcript_file).name}" if p.transcript_file else "")
        missing = store.file_problem(p)
        problem = missing or store.too_long(p)
        if problem:
            problems.append(f"{p.name}: {problem}")
        table.add_row(
            p.name,
            str(p.speaker),
            ", ".join(Path(a).name for a in p.audio) or "(none yet)",
            transcript if len(transcript) <= 40 else transcript[:39] + "…",
            "yours" if store.is_user(p) else "example",
            "[red]file missing[/]" if missing else "[red]too long[/]" if problem else "ok",
        )
    for b in broken:
        problems.append(f"{b.name}: {b.error}")
        table.add_row(b.name, "", "", "", "yours" if b.path.parent == store.user_dir else "example", "[red]broken[/]")
    console.print(table)
    for line in problems:  # the full one-line errors, after the table (they are too long for a cell)
        console.print(f"✗ {line}", markup=False, highlight=False)
    return 0


def _show(args: argparse.Namespace, console: Console) -> int:
    profile = VoiceStore().get(args.name)
    transcript = profile.transcript_text()
    console.print(f"voice:      {profile.name}")
    console.print(f"profile:    {profile.path}")
    console.print(f"speaker:    {profile.speaker}")
    files = profile.audio_paths()
    for i, f in enumerate(files):
        console.print(f"{'audio:' if i == 0 else '':<11} {f}")
    if not files:
        console.print("audio:      none yet (the first reply will become the reference)")
    if transcript is not None:
        words = len(transcript.split())
        console.print(f"transcript: {transcript if len(transcript) <= 70 else transcript[:69] + '…'} ({words} words)")
    if profile.generation.as_dict():
        console.print("generation: " + ", ".join(f"{k}={v}" for k, v in profile.generation.as_dict().items()))
    if profile.persona is not None:
        console.print(f"persona:    {' '.join(profile.persona.split())}")
    if files:
        from companion.audio.prepare import prepare_references
        from companion.refbudget import reference_cost
        from companion.refcheck import RATE, check_transcript

        settings = settings_from_args(args)
        prepared = prepare_references(files, settings.reference)
        _print_reports(console, prepared.reports, prepared.seconds)
        cost = reference_cost(settings, len(prepared.samples), transcript or "", profile.speaker)
        console.print(cost.summary() if cost.fits else f"memory: {cost.refusal(profile.name)}")
        check = check_transcript(transcript or "", sum(r.speech_seconds for r in prepared.reports))
        console.print(f"transcript: {check.rate:.1f} letters a second of speech (people speak about {RATE:.0f})")
        for problem in filter(None, [check.refusal(profile.name), *check.warnings(profile.name)]):
            console.print(f"✗ {problem}", markup=False)
    return 0


def _encode(args: argparse.Namespace, console: Console) -> int:
    from companion.commands.common import open_engine
    from companion.refcache import ReferenceCache
    from companion.voices import load_voice

    settings = settings_from_args(args)
    profile = VoiceStore().get(args.name)
    with open_engine(settings) as engine:
        start = time.perf_counter()
        voice = load_voice(profile, engine, settings.reference, ReferenceCache())
        seconds = time.perf_counter() - start
    if voice.codes is None:
        console.print(f"{profile.name}: no reference audio yet: nothing to encode")
        return 0
    how = "loaded from the cache" if voice.cache_hit else "prepared and encoded"
    k, t = voice.codes.shape
    console.print(f"{profile.name}: {t} frames x {k} codebooks ({t / engine.frame_rate:.1f} s), {how} in {seconds:.3f} s")
    if voice.reports and voice.audio is not None:
        _print_reports(console, voice.reports, len(voice.audio) / engine.sample_rate)
    return 0


def _remove(args: argparse.Namespace, console: Console) -> int:
    path = VoiceStore().remove(args.name)
    console.print(f"removed voice '{args.name}' ({path} deleted; its audio files were kept)")
    return 0


def _print_reports(console: Console, reports: list[PreparationReport], total: float) -> None:
    console.print("prepared reference (mono, 24 kHz):")
    for report in reports:
        console.print(f"  {report.summary()}")
    if len(reports) > 1:
        console.print(f"  total: {total:.1f} s (files joined with a pause)")
