from __future__ import annotations

import os
from pathlib import Path

from companion.paths import get_paths


def test_paths_live_under_companion_home(companion_home: Path) -> None:
    paths = get_paths()
    for p in (paths.config_dir, paths.data_dir, paths.cache_dir):
        assert companion_home in p.parents
    real_home = Path(os.path.expanduser("~"))
    assert real_home != Path("/root")
