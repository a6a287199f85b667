"""Driving the real `companion` binary in a real terminal (tmux), for the REPL tests."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

COMPANION = [sys.executable, "-m", "companion"]


def tmux_missing() -> str | None:
    return None if shutil.which("tmux") else "tmux is not installed (apt-get install tmux)"


class Tmux:
    """One tmux session running one command; its own server socket so tests never touch a user's tmux."""

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path, width: int = 140, height: int = 45):
        self.name = f"companion-{uuid.uuid4().hex[:8]}"
        self.socket = cwd / ".tmux.sock"
        self.exit_file = cwd / ".exit_code"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.exit_file))}; sleep 600"
        env_args = [a for k, v in env.items() if k in _PASSED for a in ("-e", f"{k}={v}")]
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), "-c", str(cwd),
                   *env_args, shell)

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {out.stderr.strip()}")
        return out.stdout

    def type_line(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)
        self._tmux("send-keys", "-t", self.name, "Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def tty_echoes(self) -> bool:
        """Whether the pane's terminal echoes typed keys now (its termios ECHO flag, read with stty)."""
        tty = self._tmux("display-message", "-p", "-t", self.name, "#{pane_tty}").strip()
        with open(tty) as stream:
            flags = subprocess.run(["stty", "-a"], stdin=stream, capture_output=True, text=True, timeout=10).stdout
        return " echo " in f" {flags.replace(chr(10), ' ').replace(';', ' ')} "

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def transcript(self) -> str:
        """Everything printed so far (scrollback included)."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def wait_for(self, pattern: str, timeout: float, *, count: int = 1, poll: float = 0.01) -> float:
        """Seconds until ``pattern`` (a regex) appears ``count`` times in the transcript."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if len(re.findall(pattern, self.transcript())) >= count:
                return time.monotonic() - start
            time.sleep(poll)
        raise AssertionError(f"{pattern!r} (x{count}) did not appear within {timeout} s; screen:\n{self.transcript()}")

    def exit_code(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exit_file.exists() and self.exit_file.read_text().strip():
                return int(self.exit_file.read_text())
            time.sleep(0.05)
        raise AssertionError(f"the program did not exit within {timeout} s; screen:\n{self.transcript()}")

    def program_pid(self) -> int:
        """The pid of the command (a child of the pane's shell)."""
        shell = int(self._tmux("list-panes", "-t", self.name, "-F", "#{pane_pid}").split()[0])
        children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        if not children:
            raise AssertionError(f"the pane's shell {shell} has no child process")
        return int(children[0])

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


_PASSED = {"COMPANION_HOME", "COMPANION_TEST_LLM_KEY", "HOME", "PULSE_SERVER", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "PATH",
           "OMP_NUM_THREADS",  # the test policy (conftest): one thread per model process
           "PYTHONPATH", "TERM", "LANG", "LC_ALL"}
