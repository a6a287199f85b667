"""What every command that loads the model shares: its arguments, the settings they make, the CPU
threads, the memory check and the loading itself."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from companion.config import Settings, load_settings
from companion.errors import CompanionError, UsageError

if TYPE_CHECKING:
    from companion.engine import Engine
    from companion.engine.memory import MemoryEstimate


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--revision/--device/--dtype/--threads, for every command that loads the model."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="ID|DIR", help="hub id or local directory (default: COMPANION_MODEL, then config, then sesame/csm-1b)")
    g.add_argument("--revision", help="hub branch, tag or commit")
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="where to run (default auto: cuda > mps > cpu)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="weights dtype (default auto: bf16 on CUDA, fp32 elsewhere)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for the model (default: engine.threads in config, else torch's own choice)")
    g.add_argument("--compile", choices=["auto", "on", "off"],
                   help="compile each frame's work into fewer, larger steps (default: engine.compile in config, "
                        "else auto: on with an NVIDIA GPU); it compiles while the first replies are spoken (a minute or more "
                        "on a machine's first start, seconds later)")


def settings_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    """The settings with the flags applied; a flag out of range is one line naming it (as argparse's own)."""
    from pydantic import ValidationError

    threads = getattr(args, "threads", None)
    overrides: dict[str, Any] = {
        "model": {
            "id": getattr(args, "model", None),
            "revision": getattr(args, "revision", None),
            "device": getattr(args, "device", None),
            "dtype": getattr(args, "dtype", None),
        },
        "engine": {"threads": threads, "compile": getattr(args, "compile", None)},
    }
    if extra:
        overrides.update(extra)
    try:
        return load_settings(overrides=overrides)
    except ValidationError as err:  # the files were checked layer by layer: this is a flag's value
        raise UsageError(flag_error(err, args)) from None


def flag_error(err: Any, args: argparse.Namespace) -> str:
    """One line for a flag's value out of range: ``--seed -5: must be greater than or equal to 0``."""
    from companion.yamlfile import plain_message

    first = err.errors()[0]
    key = str(first["loc"][-1]) if first["loc"] else ""
    flag = "--" + key.replace("_", "-")
    value = getattr(args, key, first.get("input"))
    return f"{flag} {value}: {plain_message(first, 'must be')}"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the model with ``threads`` CPU threads (None: torch's own choice), set once here for the
    whole command; the count before comes back afterwards. Yields the count in use."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def memory_estimate(settings: Settings, streams: int = 1) -> tuple[MemoryEstimate, int, str]:
    """What the model with ``context.max_seq_len`` for ``streams`` streams at once needs on its device,
    what is there, and what that is."""
    from companion.config import resolve_model_path
    from companion.engine.loading import select_device, select_dtype
    from companion.engine.memory import available_memory, estimate

    m = settings.model
    device = select_device(m.device)
    dtype_bytes = select_dtype(m.dtype, device).itemsize
    est = estimate(resolve_model_path(m.id), m.revision, settings.context.max_seq_len, dtype_bytes, streams)
    available, what = available_memory(device.type)
    return est, available, what


def check_memory(settings: Settings, streams: int = 1) -> None:
    """One line and no model work when ``context.max_seq_len`` (for ``streams`` streams at once) cannot
    fit in memory beside the weights."""
    from companion.engine.memory import fits, too_big_message

    est, available, what = memory_estimate(settings, streams)
    if not fits(est, available):
        raise CompanionError(too_big_message(est, available, what))


@contextmanager
def open_engine(settings: Settings, streams: int = 1) -> Iterator[Engine]:
    """The engine of ``settings`` for up to ``streams`` streams at once: the memory checked first, then
    loaded and run with the configured CPU threads (restored when the block ends)."""
    from companion.config import resolve_model_path

    check_memory(settings, streams)  # a model that is not there fails here, before the model code is imported
    from companion.engine import Engine

    m = settings.model
    with torch_threads(settings.engine.threads):
        yield Engine.load(resolve_model_path(m.id), revision=m.revision, device=m.device, dtype=m.dtype,
                          max_seq_len=settings.context.max_seq_len, max_batch=streams,
                          compile=settings.engine.compile)
