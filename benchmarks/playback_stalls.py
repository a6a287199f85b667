"""Playback on a busy machine: every core spinning, the player's process stopped (SIGSTOP) during each reply.

The product's real player (companion.audio.playback.Player) runs in a child process and plays a
speech-like signal through a private PulseAudio null sink, fed in Mimi-frame chunks as a generator
faster than real time would (``--rtf``). This process spins every core, stops the child for
``--stall-ms`` at ``--stalls`` evenly spaced moments of each reply, records the sink's monitor and
compares what was heard with what was sent.

    python benchmarks/playback_stalls.py                      # 5 replies of 60 s, 3 stalls of 300 ms each
    python benchmarks/playback_stalls.py --replies 2 --seconds 10 --json out.json

First sound is measured at the sink: the wall-clock time at which the reply's first sample reached the
monitor capture, minus the time play() was called (both CLOCK_MONOTONIC). Run it against another
checkout with PYTHONPATH=that/checkout to compare players on the same machine in the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from load import spinning, stall  # noqa: E402
from pulse import SizeLog, heard, pulse_server, pulseaudio_missing, speechlike  # noqa: E402


def one_reply(server, args: argparse.Namespace, seed: int) -> dict:
    env = dict(os.environ, PULSE_SERVER=server.server)
    sent = speechlike(args.seconds, seed)
    with server.capture() as cap:
        log = SizeLog(cap.path)
        log.start()
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "play_child.py"), str(args.seconds), str(seed),
                                 str(args.rtf), *([str(args.buffer_ms)] if args.buffer_ms else [])], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout is not None
        play_at = json.loads(proc.stdout.readline())["play_at"]
        stalls = []
        for k in range(args.stalls):  # evenly spaced through the reply, generation well ahead by then
            at = play_at + args.seconds * (k + 1) / (args.stalls + 1)
            time.sleep(max(0.0, at - time.monotonic()))
            stall(proc.pid, args.stall_ms / 1000)
            stalls.append(round(at - play_at, 2))
        report = json.loads(proc.stdout.readline())
        proc.wait(timeout=60)
        log.done.set()
        log.join()
    captured = cap.audio()
    onset = int(np.flatnonzero(np.abs(captured) > 1e-4)[0])
    h = heard(captured, sent)
    return {"seed": seed, "underruns": report["underruns"], "stalls_at_s": stalls,
            "first_sound_at_sink_ms": round((log.arrival(onset) - play_at) * 1000, 1),
            "stream_started_ms": round(report["first_sound_s"] * 1000, 1),
            "correlation": round(h.correlation, 5), "level_db": round(h.level_db, 3), "length_diff": h.length_diff,
            "heard_ok": h.ok()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--stalls", type=int, default=3)
    parser.add_argument("--stall-ms", type=int, default=300)
    parser.add_argument("--rtf", type=float, default=0.2, help="generation time per second of audio")
    parser.add_argument("--spinners", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--buffer-ms", type=int, help="the player's device buffer (default: the product's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reason = pulseaudio_missing()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import companion

    print(f"player: {companion.__file__}; {args.spinners} spinners; {args.replies} x {args.seconds:.0f} s; "
          f"{args.stalls} stalls of {args.stall_ms} ms; generation RTF {args.rtf}")
    results = []
    with spinning(args.spinners, seconds=args.replies * (args.seconds + 30)), pulse_server() as server:
        for i in range(args.replies):
            r = one_reply(server, args, seed=i)
            results.append(r)
            print(json.dumps(r), flush=True)
    firsts = [r["first_sound_at_sink_ms"] for r in results]
    summary = {"replies": len(results), "underruns": [r["underruns"] for r in results],
               "all_heard_ok": all(r["heard_ok"] for r in results),
               "first_sound_at_sink_ms_median": float(np.median(firsts)), "first_sound_at_sink_ms": firsts}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "summary": summary}, indent=1))
    return 0 if summary["all_heard_ok"] and not any(summary["underruns"]) else 1


if __name__ == "__main__":
    sys.exit(main())
