"""Where companion keeps its files.

``COMPANION_HOME`` moves everything under one folder (tests use it):
``$COMPANION_HOME/config``, ``$COMPANION_HOME/data``, ``$COMPANION_HOME/cache``.
Otherwise the platform's user dirs are used (platformdirs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from companion.errors import CompanionError

APP = "companion"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Paths:
    config_dir: Path  # config.yaml
    data_dir: Path  # voices/, history.sqlite3, audio/
    cache_dir: Path  # encoded references, downloaded models are in the HF cache

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.yaml"

    @property
    def voices_dir(self) -> Path:
        return self.data_dir / "voices"

    @property
    def clone_dir(self) -> Path:
        """The user's folder of reference recordings (``clone_files/``)."""
        return self.data_dir / "clone_files"

    @property
    def history_db(self) -> Path:
        return self.data_dir / "history.sqlite3"

    @property
    def audio_dir(self) -> Path:
        """Where replies are written when there is no audio device, and /save's default."""
        return self.data_dir / "audio"

    @property
    def reference_cache_dir(self) -> Path:
        return self.cache_dir / "references"

    @property
    def input_history_file(self) -> Path:
        return self.data_dir / "input_history"


def get_paths() -> Paths:
    home = os.environ.get("COMPANION_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise CompanionError(f"not a folder: {root} (COMPANION_HOME): point COMPANION_HOME at a folder "
                                 "(it is created if missing)")
        return Paths(root / "config", root / "data", root / "cache")
    return Paths(
        Path(platformdirs.user_config_dir(APP)),
        Path(platformdirs.user_data_dir(APP)),
        Path(platformdirs.user_cache_dir(APP)),
    )


def _shipped(name: str) -> Path:
    """A folder shipped with companion: the repo's own in a checkout, the wheel's copy when installed."""
    in_checkout = PACKAGE_DIR.parent / name
    if in_checkout.is_dir() and (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return in_checkout
    return PACKAGE_DIR / "_data" / name


def shipped_config_dir() -> Path:
    """``config/``: default.yaml and the example voices."""
    return _shipped("config")


def shipped_clone_dir() -> Path:
    """``clone_files/``: the example reference recordings."""
    return _shipped("clone_files")
