"""The engine's data: prompt segments, generation options, audio chunks, timing stats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Segment:
    """One utterance in the prompt."""

    speaker: int  # CSM speaker id
    text: str
    codes: torch.Tensor | None  # (K, T) int64 Mimi codes on CPU; None for the segment to be spoken


@dataclass
class GenerationOptions:
    temperature: float = 0.9  # 0 -> greedy
    topk: int = 50  # 1 -> greedy
    seed: int | None = None
    max_frames: int = 312  # 25 s at 12.5 frames/s


@dataclass
class AudioChunk:
    audio: np.ndarray  # (n,) float32, 24 kHz, in [-1, 1]
    codes: torch.Tensor  # (K, f) the frames this chunk decodes


@dataclass
class EngineStats:
    """Timings of the last ``Engine.stream`` call (for ``companion bench``)."""

    prompt_positions: int = 0  # positions of the whole prompt
    prefill_positions: int = 0  # positions actually prefilled (after prefix reuse)
    prefill_ms: float = 0.0
    first_audio_ms: float | None = None  # from the call to the first yielded chunk
    frames: int = 0  # frames generated (without the end frame)
    ms_per_frame: float = 0.0  # generation only (backbone + depth decoder), without Mimi decode
    decode_ms: float = 0.0  # Mimi decode time in total
