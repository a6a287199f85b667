"""Settings: packaged defaults (config/default.yaml) < user config.yaml < environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from companion.paths import Paths, get_paths, shipped_config_dir
from companion.yamlfile import Schema, load_yaml

DEFAULT_MODEL = "sesame/csm-1b"
UNGATED_MODEL = "unsloth/csm-1b"


class ModelSettings(Schema):
    id: str = DEFAULT_MODEL  # hub id or local directory
    revision: str | None = None
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere


class GenerationSettings(Schema):
    temperature: float = Field(0.9, ge=0.0, le=5.0)
    topk: int = Field(50, ge=1, le=2051)
    seed: int | None = None
    max_segment_seconds: float = Field(25.0, gt=0.0, le=60.0)


class ContextSettings(Schema):
    max_seq_len: int = Field(4096, ge=64)


class ReferenceSettings(Schema):
    target_lufs: float = Field(-23.0, ge=-70.0, le=0.0)
    peak_dbfs: float = Field(-1.0, ge=-30.0, le=0.0)
    trim_silence: bool = True
    max_pause_seconds: float = Field(0.6, ge=0.05)
    min_speech_seconds: float = Field(1.0, ge=0.0)


class PlaybackSettings(Schema):
    output_device: str | int | None = None
    prebuffer_ms: int = Field(200, ge=0)
    tail_silence_ms: int = Field(100, ge=0)


class WatermarkSettings(Schema):
    enabled: bool = True
    key: str = "companion"


class LLMSettings(Schema):
    enabled: bool = False
    base_url: str = "http://localhost:11434/v1"
    model: str = "llama3.2"
    api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key; the key is never stored
    system_prompt: str = "You are a warm, concise voice companion. Answer in one to three spoken sentences."
    timeout_seconds: float = Field(60.0, gt=0)
    new_line: Literal["queue", "interrupt"] = "queue"  # a line typed while a reply is spoken (chat mode)


class Settings(Schema):
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    context: ContextSettings = ContextSettings()
    reference: ReferenceSettings = ReferenceSettings()
    playback: PlaybackSettings = PlaybackSettings()
    watermark: WatermarkSettings = WatermarkSettings()
    llm: LLMSettings = LLMSettings()
    voice: str | None = None  # default voice for chat/say


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(paths: Paths | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the user's config.yaml, then ``COMPANION_MODEL``, then ``overrides`` (CLI flags).

    ``overrides`` is nested like the YAML (``{"model": {"id": "..."}}``); ``None`` values are ignored.
    Every layer is validated, so an error names the file it came from.
    """
    paths = paths or get_paths()
    merged = load_yaml(shipped_config_dir() / "default.yaml", Settings).model_dump()
    if paths.config_file.exists():
        user = load_yaml(paths.config_file, Settings)
        merged = _merge(merged, user.model_dump(exclude_unset=True))
    env_model = os.environ.get("COMPANION_MODEL")
    if env_model:
        merged = _merge(merged, {"model": {"id": env_model}})
    if overrides:
        merged = _merge(merged, _drop_none(overrides))
    return Settings.model_validate(merged)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def user_config_template() -> str:
    """The packaged default.yaml text, for ``companion doctor --init-config``."""
    return (shipped_config_dir() / "default.yaml").read_text(encoding="utf-8")


def resolve_model_path(model_id: str) -> str:
    """A local directory stays a path (absolute); anything else is a hub id."""
    p = Path(model_id).expanduser()
    return str(p.resolve()) if p.exists() else model_id
