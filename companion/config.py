"""Settings: packaged defaults (config/default.yaml) < user config.yaml < environment < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

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
    temperature: float = Field(0.9, ge=0.0, le=5.0, allow_inf_nan=False)
    topk: int = Field(50, ge=1, le=2051)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_segment_seconds: float = Field(25.0, gt=0.0, le=60.0)


# The longest context accepted: 16x the 2048 positions CSM-1B was trained on (about 40 minutes).
# What the machine's memory allows is checked before the model loads (companion.engine.memory).
MAX_SEQ_LEN_LIMIT = 32768


class ContextSettings(Schema):
    max_seq_len: int = Field(4096, ge=64, le=MAX_SEQ_LEN_LIMIT)
    prune_to: float = Field(0.6, gt=0.0, le=1.0)  # share of the turns' room kept after a prune


class EngineSettings(Schema):
    threads: int | None = Field(None, ge=1, le=1024)  # torch CPU threads; None: torch's own choice
    max_batch: int = Field(1, ge=1, le=64)  # streams generated together by serve and batch (chat: always 1)
    compile: Literal["auto", "on", "off"] = "auto"  # compiled frames (auto: on with CUDA, off elsewhere)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads an unquoted ``on`` / ``off`` as true / false: take them as meant."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


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


class ServeSettings(Schema):
    """``companion serve``: the OpenAI-compatible speech server (docs/serve.md)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = "COMPANION_API_KEY"  # name of the variable holding the key; the key is never stored
    queue_size: int = Field(8, ge=0, le=1000)  # requests waiting behind the one being spoken
    retry_after_seconds: int = Field(5, ge=1)
    max_input_chars: int = Field(4096, ge=1)
    max_body_bytes: int = Field(65536, ge=1024)
    max_conversations: int = Field(1000, ge=1)  # per API key; one more deletes the one unused longest
    conversation_days: float = Field(30.0, gt=0.0)  # a conversation unused this long is deleted
    live_conversations: int = Field(64, ge=1)  # kept in memory; others are reloaded from the history
    max_connections: int = Field(512, ge=1)  # open connections; more are closed at once (capped below the fd limit)
    header_timeout_seconds: float = Field(10.0, gt=0.0)  # to send a request's headers
    body_timeout_seconds: float = Field(20.0, gt=0.0)  # to send a request's body (408 after)
    keep_alive_seconds: float = Field(5.0, gt=0.0)  # an idle connection between requests
    cors_origins: list[str] = []
    shutdown_timeout_seconds: float = Field(30.0, ge=0.0)
    model_name: str = "csm-1b"  # the name /v1/models lists (requests may name any model)


class Settings(Schema):
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    context: ContextSettings = ContextSettings()
    engine: EngineSettings = EngineSettings()
    reference: ReferenceSettings = ReferenceSettings()
    playback: PlaybackSettings = PlaybackSettings()
    watermark: WatermarkSettings = WatermarkSettings()
    llm: LLMSettings = LLMSettings()
    serve: ServeSettings = ServeSettings()
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
