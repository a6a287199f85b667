"""Without the `eval` extra: one line saying how to install it, exit 1. The extra is really made
unimportable in a child process (a finder on sys.meta_path refuses the packages), nothing is mocked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run the real CLI with some top-level packages made unimportable, as if they were not installed.
BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = set(sys.argv[1].split(","))

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from companion.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_without(blocked: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER, blocked, *args], capture_output=True, text=True,
                          env=os.environ.copy(), cwd=cwd, timeout=300)


@pytest.mark.parametrize("action", [["voice", "guest.mp3", "guest_16k.wav"], ["session", "1", "--model", "/nowhere"]])
def test_missing_resemblyzer_is_one_line_with_the_install_command(data_dir: Path, action: list[str]) -> None:
    run = run_without("resemblyzer", "eval", *action, cwd=data_dir)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "error: measuring voices needs the optional speaker encoder, and resemblyzer is not installed: "
        "install it with pip install 'companion[eval]'"
    ]


def test_setuptools_without_pkg_resources_is_named(data_dir: Path) -> None:
    # webrtcvad (under resemblyzer) imports pkg_resources, which setuptools 81 removed.
    run = run_without("pkg_resources", "eval", "voice", "guest.mp3", "guest_16k.wav", cwd=data_dir)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "error: measuring voices needs the optional speaker encoder, and pkg_resources is not installed "
        "(setuptools 81 and later removed it: pip install 'setuptools<81'): install it with pip install 'companion[eval]'"
    ]


def test_missing_matplotlib_fails_before_any_work() -> None:
    run = run_without("matplotlib", "eval", "session", "1", "--plot", "out.png", "--model", "/nowhere")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "error: --plot needs matplotlib, which is not installed: install it with pip install 'companion[eval]'"
    ]


def test_help_and_other_commands_work_without_the_extra() -> None:
    blocked = "resemblyzer,matplotlib,webrtcvad,librosa"
    helped = run_without(blocked, "eval", "--help")
    assert helped.returncode == 0 and "pip install 'companion[eval]'" in helped.stdout
    listed = run_without(blocked, "history", "list")
    assert listed.returncode == 0 and "no conversations yet" in listed.stdout
