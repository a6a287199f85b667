"""What a voice's reference costs in the model's memory, known before the model is loaded.

A prompt holds every pinned reference, the conversation, the text to speak and the frames reserved
for the reply, all counted in positions (see companion/session/context.py). A reference costs

    positions = text tokens of "<bos>[speaker]transcript<eos>" + audio frames + 1 end frame

with the checkpoint's own tokenizer (its ``tokenizer.json``, read without loading the model) and its
codec frame rate. ``voice add`` uses this to refuse a reference that can never be used and to say what
one that fits leaves for the conversation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from companion.config import Settings

# Positions kept free for the text of a reply when a reference is checked (a sentence or two with the
# Llama-3 tokenizer). The exact text is counted again before every segment.
MIN_TEXT_POSITIONS = 48
FRAME_RATE = 12.5  # Mimi frames per second (csm-1b), when the checkpoint does not say
SAMPLE_RATE = 24000
CHARS_PER_TOKEN = 3.0  # an estimate on the safe side when the tokenizer is not downloaded (Llama-3: ~4)


def reserve_frames(settings: Settings, frame_rate: float = FRAME_RATE) -> int:
    """Frames kept free for the reply (one segment at most), as the session counts them."""
    return max(1, int(settings.generation.max_segment_seconds * frame_rate))


def longest_reference_seconds(frames: int, positions: int, room: int, frame_rate: float) -> float:
    """The longest clip of the same speech that fits ``room`` positions: a shorter clip costs its
    frames plus proportionally fewer text tokens."""
    duration = frames / frame_rate
    per_second = frame_rate + (positions - frames - 1) / max(duration, 1e-6)
    return max(0.0, (room - 1) / per_second)


@dataclass(frozen=True)
class ReferenceCost:
    """A reference's positions against the configured context."""

    frames: int
    text_positions: int
    max_seq_len: int
    reserve: int  # frames kept for the reply
    frame_rate: float
    exact: bool  # counted with the model's tokenizer (False: estimated, the model is not downloaded yet)

    @property
    def positions(self) -> int:
        return self.text_positions + self.frames + 1

    @property
    def seconds(self) -> float:
        return self.frames / self.frame_rate

    @property
    def room(self) -> int:
        """Positions a reference may take: the context less the reply's frames and a line of text."""
        return self.max_seq_len - self.reserve - MIN_TEXT_POSITIONS

    @property
    def fits(self) -> bool:
        return self.positions <= self.room

    @property
    def longest_seconds(self) -> float:
        return longest_reference_seconds(self.frames, self.positions, self.room, self.frame_rate)

    @property
    def left(self) -> int:
        """Positions left for the conversation (turns and the next text) beside this reference."""
        return max(0, self.max_seq_len - self.reserve - self.positions)

    @property
    def left_seconds(self) -> float:
        """About how many seconds of talk ``left`` holds, at this reference's own rate of text per second."""
        per_second = self.frame_rate + (self.text_positions - 2) / max(self.seconds, 1e-6)
        return self.left / per_second

    def summary(self) -> str:
        how = "" if self.exact else " (estimated: the model is not downloaded yet)"
        return (f"memory: the reference takes {self.positions} of {self.max_seq_len} positions{how}; "
                f"{self.reserve} are kept for each reply; {self.left} are left for the conversation "
                f"(about {self.left_seconds:.0f} s of talk before the oldest turns are dropped)")

    def refusal(self, name: str) -> str:
        if self.text_positions > self.frames:  # more text than audio: not speech's words (about 1 to 4)
            return (f"voice '{name}': its transcript ({self.text_positions} positions for {self.seconds:.1f} s of audio) "
                    f"is too long for the context ({self.max_seq_len} positions, {self.room} left after the reply's "
                    "frames): give only the words spoken in the recording")
        return (f"voice '{name}': its reference ({self.seconds:.1f} s, {self.positions} positions) does not fit "
                f"the context ({self.max_seq_len} positions, {self.room} left after the reply's frames): "
                f"use a reference of at most {self.longest_seconds:.1f} s, or raise context.max_seq_len in config.yaml")


def too_long(settings: Settings, name: str, files: list[Path], transcript: str, speaker: int) -> str | None:
    """The refusal ``voice add`` gives when a profile's recording can never fit the context, else None.

    Quick when it fits: the files' durations (read from their headers) bound the prepared audio from
    above. Only a recording that may be too long is prepared to count it exactly. Without the model's
    tokenizer the transcript's cost is a guess, so then only the audio alone decides.
    """
    import soundfile as sf

    from companion.audio.prepare import prepare_references

    try:
        seconds = sum(sf.info(str(f)).duration for f in files) + settings.reference.max_pause_seconds * len(files)
    except (OSError, RuntimeError):
        return None  # an unreadable file: using the voice says what is wrong with it
    if reference_cost(settings, int(seconds * SAMPLE_RATE), transcript, speaker).fits:
        return None
    from companion.errors import CompanionError

    try:
        prepared = prepare_references(files, settings.reference)
    except CompanionError:
        return None  # the same: using the voice gives the file's own error
    cost = reference_cost(settings, len(prepared.samples), transcript, speaker)
    if cost.fits or (not cost.exact and cost.frames + 3 <= cost.room):
        return None
    return cost.refusal(name)


def reference_cost(settings: Settings, samples: int, transcript: str, speaker: int) -> ReferenceCost:
    """The cost of a prepared reference of ``samples`` at 24 kHz saying ``transcript``."""
    folder = model_folder(settings)
    frame_rate = _frame_rate(folder) if folder else FRAME_RATE
    frames = math.ceil(samples * frame_rate / SAMPLE_RATE)
    tokenizer = _tokenizer(folder) if folder else None
    if tokenizer is not None:
        text = len(tokenizer.encode(f"[{speaker}]{transcript}", add_special_tokens=False).ids) + 2
    else:
        text = math.ceil(len(f"[{speaker}]{transcript}") / CHARS_PER_TOKEN) + 2
    return ReferenceCost(frames, text, settings.context.max_seq_len, reserve_frames(settings, frame_rate), frame_rate,
                         tokenizer is not None)


def model_folder(settings: Settings) -> Path | None:
    """The model's local folder (a directory, or the hub cache's snapshot), None when not downloaded."""
    local = Path(settings.model.id).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(settings.model.id, "tokenizer.json", revision=settings.model.revision)
    except Exception:  # not a valid hub id, or an unreadable cache: the estimate is used
        return None
    return Path(found).parent if isinstance(found, str) else None


def _tokenizer(folder: Path) -> Any:
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a damaged or missing file: the estimate is used, and loading the model will say more
        return None


def _frame_rate(folder: Path) -> float:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        codec = config.get("codec_config") or {}
        rate = codec.get("frame_rate") or codec.get("_frame_rate")
        if rate:
            return float(rate)
        sampling, ratios = codec.get("sampling_rate"), codec.get("upsampling_ratios")
        if sampling and ratios:  # Mimi: the encoder's strides, then a 2x downsample
            return float(sampling) / (math.prod(ratios) * 2)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return FRAME_RATE
