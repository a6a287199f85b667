"""Every turn of a saved conversation against its voice's reference: per-turn scores, mean and drift.

The caller hands in ``decode`` (stored codes ``(K, T)`` -> 24 kHz audio), so this module needs no model
loader; the references come from the voice profiles (the recording the user chose), else from the
reference the conversation stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from companion.errors import CompanionError
from companion.eval.clips import Clip, clip_from_samples, join, load_clip
from companion.eval.encoder import Embedding, embed
from companion.eval.similarity import Score, score
from companion.store import TurnRecord, VoiceRecord
from companion.voices import VoiceStore

Decode = Callable[[torch.Tensor], np.ndarray]


@dataclass
class Reference:
    """What a voice's turns are compared with: ``source`` in words, and its embedding (None: ``problem``)."""

    voice: str
    source: str
    embedding: Embedding | None = None
    band_limited: str | None = None
    problem: str | None = None


@dataclass
class TurnScore:
    seq: int
    voice: str
    text: str
    seconds: float
    score: Score | None  # None: not measured, see ``problem``
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        measured: dict[str, Any] = {"similarity": None, "verdict": "not measured"}
        if self.score is not None:
            measured = self.score.as_dict()
            measured.pop("file")
        return {"turn": self.seq, "voice": self.voice, "text": self.text, "seconds": round(self.seconds, 2),
                **measured, "problem": self.problem}


@dataclass
class Drift:
    """One voice's measured turns: their mean and the least-squares slope of similarity per turn."""

    voice: str
    reference: str
    turns: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None

    @property
    def slope(self) -> float | None:
        """Change of similarity per turn (negative: the voice drifts away); None under two turns."""
        if len(self.scores) < 2:
            return None
        return float(np.polyfit(np.asarray(self.turns, dtype=np.float64), np.asarray(self.scores), 1)[0])

    def as_dict(self) -> dict[str, Any]:
        mean, slope = self.mean, self.slope
        return {"voice": self.voice, "reference": self.reference, "turns_measured": len(self.scores),
                "mean": None if mean is None else round(mean, 4),
                "slope_per_turn": None if slope is None else round(slope, 5)}


def references(names: list[str], stored: list[VoiceRecord], decode: Decode, rate: int,
               override: Clip | None = None, profiles: VoiceStore | None = None) -> dict[str, Reference]:
    """The reference of each voice in ``names``: ``override`` for all of them when given, else the voice
    profile's recordings, else the reference stored with the conversation (decoded)."""
    if override is not None:  # a recording the user named: any problem with it is the command's error
        embedding = embed(override)
        return {n: Reference(n, override.name, embedding, override.band_limited) for n in names}
    profiles = profiles or VoiceStore()
    saved = {v.name: v for v in stored}
    out: dict[str, Reference] = {}
    for name in names:
        try:
            files = profiles.get(name).audio_paths()
        except CompanionError:
            files = []
        record = saved.get(name)
        if files:
            out[name] = _embed_reference(name, ", ".join(str(f) for f in files), partial(_load_files, name, files))
        elif record is not None and record.codes is not None:
            out[name] = _embed_reference(name, "the reference stored with the conversation",
                                         partial(_decode_clip, name, record.codes, decode, rate))
        else:
            out[name] = Reference(name, "none", problem=f"voice {name} has no reference recording to compare with")
    return out


def _load_files(name: str, files: list[Path]) -> Clip:
    return join(name, [load_clip(f) for f in files])


def _decode_clip(name: str, codes: torch.Tensor, decode: Decode, rate: int) -> Clip:
    return clip_from_samples(name, decode(codes), rate)


def _embed_reference(voice: str, source: str, load: Callable[[], Clip]) -> Reference:
    try:
        clip = load()
        return Reference(voice, source, embed(clip), clip.band_limited)
    except CompanionError as err:
        return Reference(voice, source, problem=f"reference {source}: {err}")


def score_turns(turns: list[TurnRecord], refs: dict[str, Reference], decode: Decode, rate: int,
                progress: Callable[[], None] = lambda: None) -> list[TurnScore]:
    """Decode and score each turn against its voice's reference (a turn that cannot be measured says why)."""
    out: list[TurnScore] = []
    for turn in turns:
        ref = refs[turn.voice]
        audio = decode(turn.codes)
        seconds = len(audio) / rate
        row = TurnScore(turn.seq, turn.voice, turn.text, seconds, None)
        if ref.embedding is None:
            row.problem = ref.problem
        elif turn.kind == "reference":
            row.problem = "the voice's first reply, kept as its reference"
        else:
            try:
                clip = clip_from_samples(f"turn {turn.seq}", audio, rate)
                row.score = score(ref.embedding, clip, ref.band_limited)
            except CompanionError as err:
                row.problem = str(err).removeprefix(f"turn {turn.seq}: ")
        out.append(row)
        progress()
    return out


def drift(rows: list[TurnScore], refs: dict[str, Reference]) -> list[Drift]:
    """Mean and slope per voice, in the order the voices first speak."""
    by_voice: dict[str, Drift] = {}
    for row in rows:
        d = by_voice.setdefault(row.voice, Drift(row.voice, refs[row.voice].source))
        if row.score is not None:
            d.turns.append(row.seq)
            d.scores.append(row.score.similarity)
    return list(by_voice.values())
