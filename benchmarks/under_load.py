"""Run a command on a machine made busy on purpose: spinning processes, and/or its process group stalled.

    python benchmarks/under_load.py --stall-every 4 --stall-ms 300 -- pytest -m audio tests/test_playback.py
    python benchmarks/under_load.py --spinners 1 -- pytest -m audio tests/test_playback.py

The command runs in a new process group; with --stall-every the whole group (the command and every
process it starts, except daemons such as pulseaudio that leave the group) is stopped with SIGSTOP for
--stall-ms, then continued, again and again until it exits. Exits with the command's exit code and
prints how many stalls it made.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from load import spinning  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall-every", type=float, help="seconds between stalls of the command's process group")
    parser.add_argument("--stall-ms", type=int, default=300)
    parser.add_argument("--spinners", type=int, default=0, help="processes spinning beside the command")
    parser.add_argument("--max-seconds", type=float, default=3600, help="spinners end by themselves after this")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    stalls = 0
    with spinning(args.spinners, seconds=args.max_seconds):
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            while proc.poll() is None:
                if args.stall_every is None:
                    proc.wait()
                    break
                try:
                    proc.wait(timeout=args.stall_every)
                    break
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGSTOP)
                    time.sleep(args.stall_ms / 1000)
                    os.killpg(proc.pid, signal.SIGCONT)
                    stalls += 1
                except ProcessLookupError:
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                proc.terminate()
            code = proc.wait()
    print(f"under_load: exit code {code}; {stalls} stalls of {args.stall_ms} ms; {args.spinners} spinners",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
