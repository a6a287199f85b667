"""Shared test fixtures. No test touches the real home directory: COMPANION_HOME points at tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access here; loading code must not try the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests start model subprocesses beside pytest's own model on 2 cores: one thread each avoids OpenMP
# threads spinning against each other (seen: 70x slower frames with 2 threads under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REALTIME = ("audio", "tty")  # markers of tests that run in real time: a real audio device or a real terminal


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (`-n 2`, pyproject.toml), tests that run in real time share one worker, one at a
    time (`--dist loadgroup`): two of them at once on a 2-core machine would starve each other's audio or
    terminal. Without xdist the mark does nothing."""
    for item in items:
        if any(item.get_closest_marker(name) for name in REALTIME):
            item.add_marker(pytest.mark.xdist_group("realtime"))


@pytest.fixture(autouse=True)
def companion_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own COMPANION_HOME (config, data, cache) and its own HOME."""
    home = tmp_path / "companion_home"
    home.mkdir()
    monkeypatch.setenv("COMPANION_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COMPANION_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Audio fixtures copied from ../shared/fixtures/audio (tests must not need ../shared)."""
    return DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CSM checkpoint (32 codebooks, seed 0) in the hub layout of sesame/csm-1b, built once."""
    from companion.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_csm"), codebooks=32, seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):  # -> companion.engine.Engine
    """An Engine on the tiny checkpoint (CPU, float32), shared by the engine tests.

    Tests that change its prefix cache must not rely on what an earlier test left there."""
    from companion.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", max_seq_len=1024)


@pytest.fixture(scope="session")
def speech_24k(data_dir: Path):  # -> Callable[[str, float], np.ndarray]
    """``speech_24k(name, seconds)``: the first seconds of tests/data/NAME as float32 mono 24 kHz."""
    import numpy as np
    import soundfile as sf
    import soxr

    def load(name: str, seconds: float) -> np.ndarray:
        audio, rate = sf.read(str(data_dir / name), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if rate != 24000:
            mono = soxr.resample(mono, rate, 24000)
        return np.ascontiguousarray(mono[: int(seconds * 24000)], dtype=np.float32)

    return load


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the tests that compile with inductor (mark them ``xdist_group("inductor")``:
    on one worker, the first compiles and the others find its code)."""
    return tmp_path_factory.mktemp("inductor")
