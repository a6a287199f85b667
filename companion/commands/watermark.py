"""`companion watermark`: embed or detect companion's audio watermark in an audio file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from companion import watermark
from companion.atomic import atomic_write_bytes
from companion.audio.io import encode_audio, read_audio
from companion.config import load_settings
from companion.errors import CompanionError, UsageError
from companion.oserrors import output_folder

HELP = "embed or detect companion's audio watermark in an audio file"
DESCRIPTION = (
    "Embed companion's imperceptible watermark into an audio file, or check a file for it. "
    "detect exits 0 when the mark is found, 1 when it is not, 2 when the file cannot be judged."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    embed = sub.add_parser("embed", help="write a watermarked copy of IN to OUT (format from OUT's extension)")
    embed.add_argument("input", metavar="IN", type=Path)
    embed.add_argument("output", metavar="OUT", type=Path)
    detect = sub.add_parser("detect", help="say whether FILE carries the watermark (exit 0 yes, 1 no, 2 error)")
    detect.add_argument("file", metavar="FILE", type=Path)
    for p in (embed, detect):
        p.add_argument("--key", help="watermark key (default: watermark.key from the config)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) is None:
        raise UsageError("missing action: use `companion watermark embed IN OUT` or `companion watermark detect FILE`")
    key = args.key if args.key is not None else load_settings().watermark.key
    if not key:
        raise UsageError("the watermark key is empty: pass --key or set watermark.key in the config")
    if args.action == "embed":
        return _embed(args.input, args.output, key)
    return _detect(args.file, key)


def _embed(src: Path, dst: Path, key: str) -> int:
    fmt = _output_format(dst)
    output_folder(dst.expanduser().parent, shown=str(dst))  # the rule every output follows, before the work
    audio, rate, subtype = _read(src)
    marked = watermark.embed(audio, rate, key)
    if not sf.check_format(fmt, subtype):
        subtype = sf.default_subtype(fmt)
    try:
        data = encode_audio(marked, rate, fmt, subtype)
    except sf.LibsndfileError:  # check_format accepts pairs libsndfile cannot write (an MP3's encoding in a WAV)
        data = encode_audio(marked, rate, fmt, sf.default_subtype(fmt))
    atomic_write_bytes(dst.expanduser(), data)
    print(f"wrote {dst} ({marked.shape[0] / rate:.1f} s, {rate} Hz, watermarked)")
    return 0


class DetectError(CompanionError):
    """detect could not judge the file: exit 2, so that 1 always means "no mark"."""

    exit_code = 2


def _detect(path: Path, key: str) -> int:
    try:
        audio, rate, _ = _read(path)
    except CompanionError as err:
        raise DetectError(str(err)) from None
    result = watermark.detect(audio, rate, key)
    if result.seconds < watermark.MIN_SECONDS:
        raise DetectError(
            f"{path}: {result.seconds:.1f} s is too short to judge: the detector needs at least "
            f"{watermark.MIN_SECONDS:.0f} s of audio (3 s or more is reliable)"
        )
    verdict = "watermark found" if result.detected else "no watermark"
    print(f"{path}: {verdict} (score {result.score:.1f}, threshold {result.threshold:.1f})")
    return 0 if result.detected else 1


def _read(path: Path) -> tuple[np.ndarray, int, str]:
    """(samples (n, channels) float32, sample rate, libsndfile subtype) or a one-line error."""
    audio, rate = read_audio(path)
    return audio, rate, sf.info(str(path)).subtype


def _output_format(path: Path) -> str:
    fmt = path.suffix.lstrip(".").upper()
    if fmt == "OGA":
        fmt = "OGG"
    if fmt not in sf.available_formats():
        raise UsageError(f"{path}: unknown audio extension {path.suffix!r}: use .wav, .flac, .ogg or .mp3")
    return fmt
