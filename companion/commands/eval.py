"""`companion eval`: how close a voice is to its reference (speaker similarity), per file or per saved turn."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from companion.commands.common import add_model_arguments, settings_from_args
from companion.errors import CompanionError

if TYPE_CHECKING:
    from companion.eval.conversation import Drift, TurnScore
    from companion.eval.similarity import Score

HELP = "measure how close a voice is to its reference (voice cloning fidelity and drift)"
DESCRIPTION = (
    "Speaker similarity (cosine of speaker embeddings, 1.0 = identical) with a verdict. `voice REFERENCE "
    "AUDIO...` scores audio files against a reference recording; `session ID` scores every saved turn of a "
    "conversation against its voice's reference and shows the mean and the drift (change per turn). Needs "
    "the optional speaker encoder: pip install 'companion[eval]'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    voice = sub.add_parser("voice", help="score audio files against a reference recording",
                           description="Score each AUDIO file against the REFERENCE recording (any WAV, MP3, FLAC, OGG).")
    voice.add_argument("reference", metavar="REFERENCE", type=Path, help="the voice's reference recording")
    voice.add_argument("audio", metavar="AUDIO", type=Path, nargs="+", help="the audio files to score")
    session = sub.add_parser(
        "session", help="score every turn of a saved conversation against its voice's reference",
        description="Score every saved turn of conversation ID (see `companion history list`) against its "
        "voice's reference recording (the voice profile's audio, else the reference the conversation stored). "
        "Decodes the stored speech, so it takes the model options.")
    session.add_argument("id", metavar="ID", type=int, help="the conversation's number (from `companion history list`)")
    session.add_argument("--reference", type=Path, metavar="FILE", help="compare with this recording instead")
    session.add_argument("--plot", type=Path, metavar="FILE", help="also draw similarity per turn to a PNG file")
    add_model_arguments(session)
    for p in (voice, session):
        p.add_argument("--json", action="store_true", help="print the results as JSON (for scripts)")


def run(args: argparse.Namespace) -> int:
    from companion.eval.encoder import check_installed

    check_installed()  # before any slow work
    if args.action == "voice":
        return _voice(args)
    return _session(args)


# --- eval voice ----------------------------------------------------------------------------------


def _voice(args: argparse.Namespace) -> int:
    from companion.eval.clips import load_clip
    from companion.eval.encoder import embed
    from companion.eval.similarity import score

    ref_clip = load_clip(args.reference)
    reference = embed(ref_clip)
    scores: list[Score] = []
    errors: list[dict[str, str]] = []
    for path in args.audio:
        try:
            scores.append(score(reference, load_clip(path), ref_clip.band_limited))
        except CompanionError as err:
            errors.append({"file": str(path), "error": str(err)})
            if not args.json:
                print(f"error: {err}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "reference": {"file": str(args.reference), "speech_seconds": round(reference.speech_seconds, 2),
                          "source_rate": ref_clip.source_rate, "band_limited": ref_clip.band_limited},
            "results": [s.as_dict() for s in scores], "errors": errors,
        }, indent=2))
        return 1 if errors else 0
    print(f"reference: {args.reference} ({ref_clip.source_rate / 1000:g} kHz, {reference.speech_seconds:.1f} s of speech)")
    if ref_clip.band_limited:
        print(f"warning: the reference is too band-limited to judge against ({ref_clip.band_limited})")
    if scores:
        width = max(4, *(len(s.name) for s in scores))
        print(f"{'FILE':<{width}}  {'SIMILARITY':>10}  VERDICT")
        for s in scores:
            why = f" ({s.band_limited})" if s.band_limited else ""
            print(f"{s.name:<{width}}  {s.similarity:>10.3f}  {s.verdict}{why}")
    return 1 if errors else 0


# --- eval session --------------------------------------------------------------------------------


def _session(args: argparse.Namespace) -> int:
    from companion.commands.common import open_engine
    from companion.eval.conversation import drift, references, score_turns
    from companion.paths import get_paths
    from companion.store import Store

    if args.plot is not None:
        _check_plotting()
    override = None
    if args.reference is not None:  # a bad file fails now, before the model loads
        from companion.eval.clips import load_clip

        override = load_clip(args.reference)
    path = get_paths().history_db
    if not path.exists():
        raise CompanionError("no conversations yet: start one with `companion chat`")
    with Store(path) as store:
        record = store.session(args.id)
        turns = store.turns(args.id)
        stored = store.voices(args.id)
    if not turns:
        raise CompanionError(f"conversation {args.id} has no turns to measure")
    settings = settings_from_args(args)
    with open_engine(settings) as engine:
        if turns[0].codes.shape[0] != engine.num_codebooks:
            raise CompanionError(
                f"conversation {args.id} has {turns[0].codes.shape[0]} codebooks but model {settings.model.id} has "
                f"{engine.num_codebooks}: measure it with the model it was made with ({record.model_key})"
            )
        names = list(dict.fromkeys(t.voice for t in turns))
        refs = references(names, stored, engine.decode, engine.sample_rate, override)
        with _progress(len(turns), quiet=args.json) as step:
            rows = score_turns(turns, refs, engine.decode, engine.sample_rate, step)
    drifts = drift(rows, refs)
    if args.plot is not None:
        from companion.eval.plot import write_plot

        write_plot(args.plot, args.id, drifts)
    if args.json:
        print(json.dumps({"session": args.id, "model": record.model_key, "turns": [r.as_dict() for r in rows],
                          "voices": [d.as_dict() for d in drifts],
                          "plot": None if args.plot is None else str(args.plot)}, indent=2))
    else:
        _print_session(args.id, rows, drifts, refs)
        if args.plot is not None:
            print(f"wrote {args.plot}")
    return 0 if any(d.scores for d in drifts) else 1  # nothing measured: a script must not read it as a result


def _print_session(session_id: int, rows: list[TurnScore], drifts: list[Drift], refs: dict[str, Any]) -> None:
    print(f"conversation {session_id}: {len(rows)} turns")
    for name, ref in refs.items():
        print(f"voice {name}: reference {ref.source}")
        if ref.band_limited:
            print(f"warning: the reference of {name} is too band-limited to judge against ({ref.band_limited})")
    voice_width = max(5, *(len(r.voice) for r in rows))
    print(f"{'TURN':>4}  {'VOICE':<{voice_width}}  {'LENGTH':>6}  {'SIMILARITY':>10}  {'VERDICT':<25}  TEXT")
    for r in rows:
        text = " ".join(r.text.split())
        text = text if len(text) <= 40 else text[:39] + "\u2026"
        if r.score is None:
            print(f"{r.seq:>4}  {r.voice:<{voice_width}}  {r.seconds:>5.1f}s  {'-':>10}  {'not measured':<25}  {text}  ({r.problem})")
        else:
            print(f"{r.seq:>4}  {r.voice:<{voice_width}}  {r.seconds:>5.1f}s  {r.score.similarity:>10.3f}  "
                  f"{r.score.verdict:<25}  {text}")
    for d in drifts:
        if d.mean is None:
            print(f"{d.voice}: no turn could be measured")
            continue
        slope = "n/a (one turn)" if d.slope is None else f"{d.slope:+.4f} per turn"
        print(f"{d.voice}: mean {d.mean:.3f} over {len(d.scores)} turns, drift {slope}")


def _check_plotting() -> None:
    from companion.eval.encoder import INSTALL

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompanionError(f"--plot needs matplotlib, which is not installed: install it with {INSTALL}") from None


class _progress:
    """A progress bar on stderr while turns are decoded and scored (nothing with --json or off a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(file=sys.stderr)
        self.bar = Progress(TextColumn("measuring turns"), BarColumn(), MofNCompleteColumn(), console=console,
                            transient=True, disable=quiet or not console.is_terminal)
        self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> Any:
        self.bar.__enter__()
        return lambda: self.bar.advance(self.task)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)
