"""`companion download`: download the model into the local Hugging Face cache (explains gated repos)."""

from __future__ import annotations

import argparse
from pathlib import Path

from companion.commands.common import settings_from_args

HELP = "download the model into the local cache (explains gated repos)"
DESCRIPTION = (
    "Download the CSM checkpoint (weights, tokenizer, processor files) into the Hugging Face cache, "
    "with a progress bar, so that later runs work offline. sesame/csm-1b is gated: accept its terms on "
    "the hub and log in with `hf auth login` first, or use the ungated copy unsloth/csm-1b."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="ID", help="hub id (default: COMPANION_MODEL, then config, then sesame/csm-1b)"
    )
    parser.add_argument("--revision", help="hub branch, tag or commit (default: the main branch)")


def run(args: argparse.Namespace) -> int:
    from companion.engine.loading import check_model_dir, download_model

    settings = settings_from_args(args)
    model, revision = settings.model.id, settings.model.revision
    local = Path(model).expanduser()
    if local.is_dir():
        check_model_dir(local.resolve())
        print(f"{model} is a local directory with a complete checkpoint: nothing to download")
        return 0
    path = download_model(model, revision, downloading=True)
    print(f"{model}{f' ({revision})' if revision else ''} is in the cache: {path}")
    return 0
