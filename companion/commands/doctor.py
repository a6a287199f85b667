"""`companion doctor`: check the installation: torch, device, audio, model cache, config."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from companion import __version__
from companion.atomic import atomic_write_text
from companion.config import Settings, load_settings, user_config_template
from companion.errors import CompanionError
from companion.paths import Paths, get_paths, shipped_config_dir

if TYPE_CHECKING:
    from companion.voices import VoiceProfile

HELP = "check the installation: torch, device, audio, model cache, config"
DESCRIPTION = (
    "Check python, torch, the compute device, audio output, the config file, companion's folders, "
    "the model cache and the voices. Exits 1 when something essential is broken."
)

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str  # what was found and, when not OK, how to fix it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init-config",
        action="store_true",
        help="write the commented default config.yaml to your config path (if there is none yet)",
    )


def run(args: argparse.Namespace) -> int:
    paths = get_paths()
    if args.init_config:
        print(init_config(paths))
    checks = run_checks(paths)
    _print_table(checks)
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        print(f"doctor: {len(failed)} problem(s) to fix: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def init_config(paths: Paths) -> str:
    """Write the default config to ``paths.config_file`` unless one exists; returns what happened."""
    target = paths.config_file
    if target.exists():
        return f"{target} already exists: left unchanged (delete it first to start over)"
    try:
        atomic_write_text(target, user_config_template())
    except OSError as err:
        raise CompanionError(f"cannot write {target}: {err.strerror}: check the folder's permissions") from None
    return f"wrote the default config to {target}"


def run_checks(paths: Paths) -> list[Check]:
    settings, config_check = _config_check(paths)
    checks = [
        Check("python", OK, f"{platform.python_version()} ({sys.executable}); companion {__version__}"),
        _guard("torch", _torch_check),
        _guard("transformers", _transformers_check),
        _guard("device", lambda: _device_check(settings)),
        _guard("threads", lambda: _threads_check(settings)),
        *_audio_checks(),
        config_check,
        _dir_check("data dir", paths.data_dir),
        _dir_check("cache dir", paths.cache_dir),
        _guard("model", lambda: _model_check(settings)),
        _guard("context", lambda: _context_check(settings, config_check)),
        *_voices_checks(paths, settings if config_check.status != FAIL else None),
        _llm_check(settings),
    ]
    return checks


def _guard(name: str, check: Callable[[], Check]) -> Check:
    """Run one check; a failure inside it is a FAIL row instead of a crash."""
    try:
        return check()
    except ImportError as err:
        return Check(name, FAIL, f"cannot import: {err}: reinstall companion (`pip install -U companion`)")
    except Exception as err:  # doctor reports problems, it does not stop at the first one
        return Check(name, FAIL, f"check failed ({type(err).__name__}: {err}): please report it")


def _torch_check() -> Check:
    import torch

    return Check("torch", OK, torch.__version__)


def _threads_check(settings: Settings) -> Check:
    import torch

    configured = settings.engine.threads
    if configured is None:
        return Check("threads", OK, f"{torch.get_num_threads()} CPU threads (torch's own choice; engine.threads or --threads to set)")
    return Check("threads", OK, f"{configured} CPU threads (engine.threads; torch's own choice here: {torch.get_num_threads()})")


def _context_check(settings: Settings, config_check: Check) -> Check:
    """context.max_seq_len against the memory the model and its context need (estimated, nothing loaded)."""
    from companion.commands.common import memory_estimate
    from companion.engine.memory import fits, gib, too_big_message

    if config_check.status == FAIL:
        return Check("context", WARN, "not checked: the config is invalid (see the config row)")
    try:
        est, available, what = memory_estimate(settings)
    except CompanionError as err:  # e.g. a device that is not there: its own row says so
        return Check("context", WARN, f"not checked: {err}")
    if not fits(est, available):
        return Check("context", FAIL, too_big_message(est, available, what))
    n = settings.context.max_seq_len
    beyond = "; CSM-1B was trained on 2048" if n > 2048 else ""
    return Check("context", OK, f"{n} positions{beyond}: about {gib(est.total)} with the weights "
                                f"(context {gib(est.context)}), {gib(available)} {what}")


def _transformers_check() -> Check:
    import transformers

    return Check("transformers", OK, transformers.__version__)


def _device_check(settings: Settings) -> Check:
    import torch

    wanted = settings.model.device
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if wanted == "cuda" and not cuda:
        return Check("device", FAIL, "model.device is cuda but torch sees no CUDA GPU: set model.device: auto")
    if wanted == "mps" and not mps:
        return Check("device", FAIL, "model.device is mps but MPS is not available: set model.device: auto")
    if cuda and wanted in ("auto", "cuda"):
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        return Check("device", OK, f"cuda: {torch.cuda.get_device_name(0)} (bf16: {bf16})")
    if mps and wanted in ("auto", "mps"):
        return Check("device", OK, "mps (Apple GPU; float32)")
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = {True: "yes", False: "no (use dtype float32)", None: "unknown"}[_cpu_has_bf16()]
    return Check("device", WARN if wanted == "auto" else OK,
                 f"cpu ({capability}, bf16: {bf16}): slower than real time without a GPU")


def _cpu_has_bf16() -> bool | None:
    """Whether the CPU has bf16 instructions (Linux /proc/cpuinfo), None if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _audio_checks() -> list[Check]:
    try:
        import sounddevice as sd
    except (OSError, ImportError) as err:
        fix = "install PortAudio (apt install libportaudio2, brew install portaudio)"
        return [Check("audio", WARN, f"PortAudio not available ({err}): {fix}; replies are written to files")]
    version = sd.get_portaudio_version()[1]
    try:
        devices = [d for d in sd.query_devices() if d["max_output_channels"] > 0]
        default = sd.query_devices(kind="output")["name"] if devices else None
    except Exception as err:  # PortAudio errors are not OSError subclasses
        return [Check("audio", WARN, f"{version}: cannot list devices ({err})")]
    if not devices:
        return [
            Check("audio", OK, version),
            Check("output devices", WARN, "none found: replies are written to files; connect a speaker or start PulseAudio"),
        ]
    return [Check("audio", OK, version), Check("output devices", OK, f"{len(devices)}; default: {default}")]


def _config_check(paths: Paths) -> tuple[Settings, Check]:
    path = paths.config_file
    try:
        settings = load_settings(paths)
    except CompanionError as err:
        return Settings(), Check("config", FAIL, str(err))
    if not path.exists():
        return settings, Check("config", OK, f"{path} (not created; defaults in use; `companion doctor --init-config`)")
    return settings, Check("config", OK, f"{path} (valid)")


def _dir_check(name: str, path: Path) -> Check:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Check(name, FAIL, f"{path}: {existing} is not a writable folder: fix its permissions or set COMPANION_HOME")
    state = "" if path.exists() else " (created on first use)"
    return Check(name, OK, f"{path}{state}")


def _model_check(settings: Settings) -> Check:
    model_id, revision = settings.model.id, settings.model.revision
    local = Path(model_id).expanduser()
    if local.exists():
        return _local_model_check(local)
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ValueError as err:  # an id that is neither a folder nor a valid repo id
        return Check("model", FAIL, f"{model_id}: not a folder and not a hub id ({err}): fix model.id")
    at = f"@{revision}" if revision else ""
    if not isinstance(found, str):
        hint = _token_hint(model_id)
        return Check("model", WARN, f"{model_id}{at}: not downloaded yet: run `companion download`{hint}")
    snapshot = Path(found).parent
    if not any(snapshot.glob("*.safetensors")):
        return Check("model", WARN, f"{model_id}{at}: weights missing in the cache: run `companion download` again")
    return Check("model", OK, f"{model_id}{at}: in the HF cache ({_cache_size(model_id)})")


def _local_model_check(folder: Path) -> Check:
    if not folder.is_dir():
        return Check("model", FAIL, f"{folder}: is a file, expected a model folder: point model.id at the folder")
    missing = [n for n in ("config.json",) if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        return Check("model", FAIL, f"{folder}: missing {', '.join(missing)}: use a folder written by save_pretrained")
    return Check("model", OK, f"{folder} (local folder)")


def _token_hint(model_id: str) -> str:
    from huggingface_hub import get_token

    if model_id.startswith("sesame/") and get_token() is None:
        return " (sesame/csm-1b is gated: accept its terms and `hf auth login`, or use unsloth/csm-1b)"
    return ""


def _cache_size(model_id: str) -> str:
    from huggingface_hub import scan_cache_dir

    try:
        repos = [r for r in scan_cache_dir().repos if r.repo_id == model_id and r.repo_type == "model"]
    except Exception:  # a damaged cache is reported by `companion download`, not here
        return "size unknown"
    return repos[0].size_on_disk_str if repos else "size unknown"


def _voices_checks(paths: Paths, settings: Settings | None) -> list[Check]:
    """One row for the voices, then a FAIL row for each profile that cannot be used, with its error, and
    a WARN row for each transcript that may not be the words of its recording."""
    from companion.voices import VoiceStore

    store = VoiceStore(paths)
    user = _yaml_files(paths.voices_dir)
    shipped = _yaml_files(shipped_config_dir() / "voices")
    total = len(user) + len(shipped)
    failures = [Check(f"voice {b.name}", FAIL, b.error) for b in store.broken()]
    for p in store.list():
        problem = store.file_problem(p) or (store.too_long(p, settings) if settings is not None else None)
        if problem:
            failures.append(Check(f"voice {p.name}", FAIL, problem))
        elif settings is not None:
            failures += _transcript_rows(p, settings)
    status = OK if total else WARN  # each profile that cannot be used is its own FAIL row
    fix = "" if total else ": add one with `companion voice add`"
    unusable = sum(c.status == FAIL for c in failures)
    broken = f"; {unusable} cannot be used (below)" if unusable else ""
    summary = Check("voices", status, f"{total} ({len(user)} yours in {paths.voices_dir}, {len(shipped)} shipped){broken}{fix}")
    return [summary, *failures]


def _transcript_rows(profile: VoiceProfile, settings: Settings) -> list[Check]:
    """The transcript plausibility check of ``voice add``, on a saved profile (its recording prepared)."""
    from companion.audio.prepare import prepare_references
    from companion.refcheck import check_transcript

    files = profile.audio_paths()
    if not files:
        return []
    name = f"voice {profile.name}"
    try:
        prepared = prepare_references(files, settings.reference)
    except CompanionError as err:
        return [Check(name, FAIL, str(err))]
    except Exception as err:  # doctor reports problems, it does not stop at the first one
        return [Check(name, FAIL, f"check failed ({type(err).__name__}: {err}): please report it")]
    check = check_transcript(profile.transcript_text() or "", sum(r.speech_seconds for r in prepared.reports))
    refusal = check.refusal(profile.name)
    if refusal:
        return [Check(name, FAIL, refusal)]
    return [Check(name, WARN, warning) for warning in check.warnings(profile.name)]


def _yaml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _llm_check(settings: Settings) -> Check:
    llm = settings.llm
    if not llm.enabled:
        return Check("llm", OK, "disabled (llm.enabled: false)")
    key = "set" if os.environ.get(llm.api_key_env) else "not set (fine for local servers)"
    return Check("llm", OK, f"{llm.model} at {llm.base_url}; ${llm.api_key_env} {key}")


def _print_table(checks: list[Check]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    table = Table(title="companion doctor", show_lines=False)
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    colors = {OK: "green", WARN: "yellow", FAIL: "bold red"}
    for c in checks:
        table.add_row(c.name, f"[{colors[c.status]}]{c.status}[/]", escape(c.detail), end_section=False)
    console.print(table)
