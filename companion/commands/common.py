"""Arguments shared by several subcommands, and turning them into settings."""

from __future__ import annotations

import argparse
from typing import Any

from companion.config import Settings, load_settings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--revision/--device/--dtype, for every command that loads the model."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="ID|DIR", help="hub id or local directory (default: COMPANION_MODEL, then config, then sesame/csm-1b)")
    g.add_argument("--revision", help="hub branch, tag or commit")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="where to run (default auto: cuda > mps > cpu)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="weights dtype (default auto: bf16 on CUDA, fp32 elsewhere)")


def settings_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    overrides: dict[str, Any] = {
        "model": {
            "id": getattr(args, "model", None),
            "revision": getattr(args, "revision", None),
            "device": getattr(args, "device", None),
            "dtype": getattr(args, "dtype", None),
        }
    }
    if extra:
        overrides.update(extra)
    return load_settings(overrides=overrides)
