"""The speaker encoder: resemblyzer's GE2E model (weights ship in its wheel), from the optional ``eval`` extra.

resemblyzer is imported on first use, so the rest of companion works without it; a missing extra is one
line saying how to install it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.errors import CompanionError
from companion.eval.clips import RATE, Clip

INSTALL = "pip install 'companion[eval]'"
# Speech left after the encoder's own silence trimming below which a clip is too short to embed
# (the encoder looks at 1.6 s windows; under a second it would mostly see padding).
MIN_SPEECH_SECONDS = 1.0


class ExtraMissing(CompanionError):
    """The ``eval`` extra (resemblyzer) is not installed."""


@dataclass
class Embedding:
    """A unit-length speaker embedding ``(256,)`` and how much speech it was made from."""

    vector: np.ndarray
    speech_seconds: float


_lock = threading.Lock()
_encoder: Any = None


def _resemblyzer() -> Any:
    try:
        with warnings.catch_warnings():  # webrtcvad imports pkg_resources, which warns that it is deprecated
            warnings.simplefilter("ignore")
            import resemblyzer
    except ImportError as err:
        missing = getattr(err, "name", None) or "resemblyzer"
        hint = " (setuptools 81 and later removed it: pip install 'setuptools<81')" if missing == "pkg_resources" else ""
        raise ExtraMissing(
            f"measuring voices needs the optional speaker encoder, and {missing} is not installed{hint}: "
            f"install it with {INSTALL}"
        ) from None
    return resemblyzer


def check_installed() -> None:
    """Raise ExtraMissing now (before slow work such as loading the model) when the extra is absent."""
    _resemblyzer()


def embed(clip: Clip) -> Embedding:
    """The speaker embedding of ``clip``. Raises CompanionError when it has too little speech."""
    global _encoder
    resemblyzer = _resemblyzer()
    with _lock:
        if _encoder is None:
            _encoder = resemblyzer.VoiceEncoder("cpu", verbose=False)
        if not np.any(clip.samples):
            raise CompanionError(f"{clip.name}: contains only silence: there is no voice in it to measure")
        # resemblyzer's own preparation: loudness to -30 dBFS and long silences cut (webrtcvad)
        with np.errstate(all="ignore"):
            speech = resemblyzer.preprocess_wav(clip.samples, source_sr=RATE)
        seconds = len(speech) / RATE
        if seconds < MIN_SPEECH_SECONDS:
            raise CompanionError(
                f"{clip.name}: too short to measure ({seconds:.1f} s of speech, at least {MIN_SPEECH_SECONDS:.0f} s "
                "needed): use a longer clip"
            )
        vector = np.asarray(_encoder.embed_utterance(speech), dtype=np.float32)
    return Embedding(vector, seconds)
