"""The session's audio bookkeeping: the conversation so far (spooled to disk), per-turn stats, the watermark."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from companion.config import Settings

GAP_SECONDS = 0.25  # silence between utterances in the whole-conversation audio


@dataclass
class TurnStats:
    """How one segment went (``/stats``)."""

    voice: str
    text: str
    frames: int
    audio_seconds: float
    first_audio_ms: float | None  # from the start of the segment to its first audio chunk
    rtf: float | None  # wall time / audio time (below 1: faster than real time)
    prompt_positions: int
    prefill_positions: int
    dropped_turns: int  # turns pruned from the context to make room for this one
    cancelled: bool = False
    bootstrap: bool = False  # this segment became its voice's reference


class AudioLog:
    """Every completed utterance of the session, in order, kept in a temporary file (not in memory)."""

    def __init__(self, sample_rate: int = 24000) -> None:
        self.sample_rate = sample_rate
        self._file = tempfile.TemporaryFile(prefix="companion-conversation-")
        self.samples = 0

    def append(self, audio: np.ndarray) -> None:
        """Add one utterance (with a short silence before it, unless it is the first)."""
        if len(audio) == 0:
            return
        if self.samples:
            gap = np.zeros(int(GAP_SECONDS * self.sample_rate), dtype=np.float32)
            self._file.write(gap.tobytes())
            self.samples += len(gap)
        data = np.asarray(audio, dtype=np.float32)
        self._file.write(data.tobytes())
        self.samples += len(data)

    def read(self) -> np.ndarray:
        """(n,) float32: the whole conversation."""
        self._file.flush()
        self._file.seek(0)
        data = np.frombuffer(self._file.read(), dtype=np.float32).copy()
        self._file.seek(0, 2)
        return data

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def close(self) -> None:
        self._file.close()


def output_marker(settings: Settings) -> Callable[[np.ndarray], np.ndarray] | None:
    """The watermark embedder for one utterance (``apply(chunk)``), or None when it is switched off."""
    if not settings.watermark.enabled:
        return None
    from companion.watermark import Watermarker

    return Watermarker(settings.watermark.key).apply
