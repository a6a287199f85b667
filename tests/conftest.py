"""Shared test fixtures. No test touches the real home directory: COMPANION_HOME points at tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access here; loading code must not try the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
