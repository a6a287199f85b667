"""Speaker similarity (cosine of speaker embeddings) and the verdict bands a number is read with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.eval.clips import Clip
from companion.eval.encoder import Embedding, embed

# (lowest score, verdict), best first. resemblyzer's scale: recordings of one person on different
# microphones are usually 0.85-0.95, cloned or synthetic voices of different people can reach 0.9+
# (two espeak voices score 0.93), unrelated speakers are usually below 0.75.
BANDS: list[tuple[float, str]] = [
    (0.95, "same voice"),
    (0.85, "similar voice"),
    (0.75, "weak resemblance"),
    (-1.0, "different voice"),
]
TOO_NARROW = "too band-limited to judge"


def verdict(score: float) -> str:
    return next(name for low, name in BANDS if score >= low)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclass
class Score:
    """One clip against a reference."""

    name: str
    similarity: float
    speech_seconds: float
    source_rate: int
    high_band_share: float
    band_limited: str | None  # why the score cannot be trusted, or None

    @property
    def verdict(self) -> str:
        return TOO_NARROW if self.band_limited else verdict(self.similarity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "similarity": round(self.similarity, 4),
            "verdict": self.verdict,
            "band_limited": self.band_limited,
            "speech_seconds": round(self.speech_seconds, 2),
            "source_rate": self.source_rate,
            "high_band_share": round(self.high_band_share, 5),
        }


def score(reference: Embedding, clip: Clip, reference_band_limited: str | None = None) -> Score:
    """``clip`` against an embedded reference (a band-limited reference makes every verdict unsure)."""
    emb = embed(clip)
    narrow = clip.band_limited or (f"the reference: {reference_band_limited}" if reference_band_limited else None)
    return Score(clip.name, cosine(reference.vector, emb.vector), emb.speech_seconds, clip.source_rate,
                 clip.high_band_share, narrow)
