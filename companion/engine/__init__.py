"""CSM loading, the frame loop, KV/prefix caches and streaming Mimi decode (see docs/engine.md).

The names below load on first use (PEP 562): a light submodule (the memory estimate, the errors) does
not pull in transformers, so a command that fails before the model loads fails quickly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from companion.lazy import lazy_names

if TYPE_CHECKING:
    from companion.engine.engine import Engine
    from companion.engine.errors import ContextTooLong, ModelLoadError
    from companion.engine.types import AudioChunk, EngineStats, GenerationOptions, Segment

_WHERE = {
    "Engine": "engine",
    "ContextTooLong": "errors", "ModelLoadError": "errors",
    "AudioChunk": "types", "EngineStats": "types", "GenerationOptions": "types", "Segment": "types",
}

__all__ = [
    "AudioChunk",
    "ContextTooLong",
    "Engine",
    "EngineStats",
    "GenerationOptions",
    "ModelLoadError",
    "Segment",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())
