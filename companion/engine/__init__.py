"""CSM loading, the frame loop, KV/prefix caches and streaming Mimi decode (see docs/engine.md)."""

from __future__ import annotations

from companion.engine.engine import Engine
from companion.engine.errors import ContextTooLong, ModelLoadError
from companion.engine.types import AudioChunk, EngineStats, GenerationOptions, Segment

__all__ = [
    "AudioChunk",
    "ContextTooLong",
    "Engine",
    "EngineStats",
    "GenerationOptions",
    "ModelLoadError",
    "Segment",
]
