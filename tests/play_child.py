"""Plays one speech-like reply with the product's Player in its own process, so a test can stall it.

    python tests/play_child.py SECONDS SEED RTF [BUFFER_MS]

Prints two JSON lines on stdout: {"play_at": t} when play() is called (CLOCK_MONOTONIC), then the
report. The reply is fed in Mimi-frame chunks, each after RTF * 80 ms (a generator at that speed).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pulse import FRAME, RATE, speechlike  # noqa: E402


def main(seconds: float, seed: int, rtf: float, buffer_ms: int | None = None) -> None:
    from companion.audio.playback import Player

    audio = speechlike(seconds, seed)
    player = (Player() if buffer_ms is None else Player(buffer_ms=buffer_ms)).check()

    def generate() -> Iterator:
        for i in range(0, len(audio), FRAME):
            time.sleep(rtf * FRAME / RATE)
            yield audio[i : i + FRAME]

    print(json.dumps({"play_at": time.monotonic()}), flush=True)
    report = player.play(generate(), expected_seconds=seconds)
    print(json.dumps({"underruns": report.underruns, "first_sound_s": report.first_sound_s,
                      "cancelled": report.cancelled, "total_underruns": player.underruns}), flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
