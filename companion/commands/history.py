"""`companion history`: list, show and export past conversations (the SQLite history)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from companion.commands.common import add_model_arguments, settings_from_args
from companion.errors import CompanionError

if TYPE_CHECKING:
    from companion.store import Store

HELP = "list, show and export past conversations"
DESCRIPTION = (
    "Past conversations, from the history database in the data folder: `list` them (newest first), `show ID` "
    "one (voices and turns), `export ID FILE.wav` its audio (decodes the stored codes with the model the conversation was recorded "
    "with, or --model). "
    "Resume one in the app with `companion chat --resume ID`. Without ACTION: list."
)
FRAME_RATE = 12.5  # Mimi frames per second
GAP_SECONDS = 0.25  # silence between turns in an export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")  # none: list
    ls = sub.add_parser("list", help="the conversations, newest first")
    ls.add_argument("--limit", type=int, default=20, help="show at most this many (default 20)")
    show = sub.add_parser("show", help="one conversation's voices and turns")
    show.add_argument("id", type=int, help="the conversation's number (from `history list`)")
    export = sub.add_parser("export", help="a conversation's audio as one WAV file")
    export.add_argument("id", type=int, help="the conversation's number (from `history list`)")
    export.add_argument("file", type=Path, help="the WAV file to write")
    add_model_arguments(export)


def run(args: argparse.Namespace) -> int:
    from companion.paths import get_paths
    from companion.store import Store

    path = get_paths().history_db
    if not path.exists() and args.action != "export":
        print("no conversations yet: start one with `companion chat`")
        return 0
    with Store(path) as store:
        if args.action in (None, "list"):
            return _list(store, getattr(args, "limit", 20))
        if args.action == "show":
            return _show(store, args.id)
        return _export(store, args)


def _seconds(frames: int) -> str:
    return f"{frames / FRAME_RATE:.1f} s"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _when(stamp: str) -> str:
    return stamp[:19].replace("T", " ")


def _list(store: Store, limit: int) -> int:
    sessions = store.sessions(limit=limit)
    if not sessions:
        print("no conversations yet: start one with `companion chat`")
        return 0
    print(f"{'ID':>4}  {'UPDATED (UTC)':<19}  {'TURNS':>5}  {'VOICE':<12}  FIRST LINE")
    for s in sessions:
        print(f"{s.id:>4}  {_when(s.updated_at):<19}  {s.turn_count:>5}  {(s.voice or '-'):<12}  {_short(s.first_text or '', 50)}")
    return 0


def _show(store: Store, session_id: int) -> int:
    s = store.session(session_id)
    print(f"conversation {s.id}: started {_when(s.created_at)}, updated {_when(s.updated_at)} (UTC), model {s.model_key}")
    print(f"context: {s.max_seq_len} positions; turns from {s.context_start} on are in memory (resume: companion chat --resume {s.id})")
    for v in store.voices(session_id):
        ref = f"reference {_seconds(v.codes.shape[-1])}: {_short(v.transcript or '', 50)}" if v.codes is not None else "no reference"
        print(f"voice {v.name} (speaker {v.speaker}): {ref}")
    for t in store.turns(session_id):
        note = " [reference]" if t.kind == "reference" else (" [not in memory]" if t.seq < s.context_start else "")
        print(f"{t.seq:>4}  {_when(t.created_at)[11:]}  {t.voice:<12} {_seconds(t.codes.shape[-1]):>7}{note}  {t.text}")
        if t.typed is not None and t.typed != t.text:
            print(f"{'':>4}  {'typed:':>8}  {t.typed}")
    return 0


def _export(store: Store, args: argparse.Namespace) -> int:
    from companion.audio.io import write_wav
    from companion.commands.chat import check_output_file
    from companion.commands.common import open_engine

    args.file = check_output_file(args.file, "export")
    record = store.session(args.id)
    turns = store.turns(args.id)
    if not turns:
        raise CompanionError(f"conversation {args.id} has no turns to export")
    if args.model is None:  # the model it was recorded with (a hub id at the recorded commit, or a folder)
        recorded, _, version = record.model_key.rpartition("@")
        args.model = recorded or record.model_key
        if args.revision is None and version and not Path(recorded).is_absolute():
            args.revision = version
    settings = settings_from_args(args)
    with open_engine(settings) as engine:
        audio = _decode_turns(engine, record, turns, settings, args.id)
    write_wav(args.file, audio, engine.sample_rate)
    print(f"wrote {args.file} ({len(audio) / engine.sample_rate:.1f} s, {len(turns)} turns)")
    return 0


def _decode_turns(engine: Any, record: Any, turns: list[Any], settings: Any, session_id: int) -> np.ndarray:
    """Every turn decoded, with gaps between them, watermarked when the settings say so."""
    if turns[0].codes.shape[0] != engine.num_codebooks:
        raise CompanionError(
            f"conversation {session_id} has {turns[0].codes.shape[0]} codebooks but model {settings.model.id} has "
            f"{engine.num_codebooks}: export it with the model it was made with ({record.model_key})"
        )
    if record.model_key != engine.model_key:
        print(f"warning: conversation {session_id} was made with {record.model_key}; decoding with {engine.model_key}",
              file=sys.stderr)
    gap = np.zeros(int(GAP_SECONDS * engine.sample_rate), dtype=np.float32)
    pieces: list[np.ndarray] = []
    for t in turns:
        pieces += [gap] if pieces else []
        pieces.append(engine.decode(t.codes))
    audio = np.concatenate(pieces)
    if settings.watermark.enabled:
        from companion.watermark import embed

        audio = embed(audio, engine.sample_rate, settings.watermark.key)
    return audio
