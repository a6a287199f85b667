"""The speed and memory figures that unit tests used to assert, measured here instead (docs/benchmarks.md).

    python benchmarks/unit_figures.py                 # all of them (about 3 minutes)
    python benchmarks/unit_figures.py --only watermark refcache --json figures.json

- refcache: loading a 118 s MP3 voice cold (decode, prepare, encode) and then from the cache (tiny
  engine); the ratio cold / warm (the test asserted > 10).
- watermark: ms to mark one 80 ms chunk, best of 5 x 200 chunks (the test asserted < 2 ms).
- session: resident memory after 50 and 200 one-word turns on the tiny engine with pruning (the test
  asserted within 5 %).
- stop: Player.stop() 1 s into a 6 s reply, through a PulseAudio null sink: until play() returns and
  until the sink goes silent (the test asserted play() returned within 300 ms).
- ctrl_c: `companion chat` on a real terminal (tmux), Ctrl-C a second into a long generation: until the
  "cancelled" line is on the screen (the test asserted < 1 s).
Each is repeated ``--repeats`` times; all runs are kept, the best is reported (load only adds time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT / "tests"))


def watermark(repeats: int, _model: Path) -> dict:
    import soundfile as sf
    import soxr

    from companion.watermark import Watermarker

    audio, rate = sf.read(str(DATA / "guest_16k.wav"), dtype="float32")
    chunk = soxr.resample(audio, rate, 24000)[24000 : 24000 + 1920].astype(np.float32)
    wm, runs = Watermarker("bench-key"), []
    for _ in range(max(5, repeats)):
        start = time.perf_counter()
        for _ in range(200):
            wm.apply(chunk)
        runs.append((time.perf_counter() - start) / 200 * 1000)
    return {"ms_per_80ms_chunk": min(runs), "runs": runs, "share_of_real_time": min(runs) / 80}


def refcache(repeats: int, model: Path) -> dict:
    from companion.config import ReferenceSettings
    from companion.engine import Engine
    from companion.paths import get_paths
    from companion.refcache import ReferenceCache
    from companion.voices import VoiceProfile, VoiceStore, load_voice

    engine = Engine.load(str(model), device="cpu")
    cold, warm = [], []
    for i in range(repeats):
        clone_dir = get_paths().clone_dir
        clone_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "narrator.mp3", clone_dir / "narrator.mp3")
        name = f"reader{i}"
        VoiceStore().add(VoiceProfile(name=name, audio="narrator.mp3",
                                      transcript=(DATA / "narrator.txt").read_text(encoding="utf-8")))
        shutil.rmtree(ReferenceCache().directory, ignore_errors=True)
        start = time.perf_counter()
        load_voice(VoiceStore().get(name), engine, ReferenceSettings(), ReferenceCache())
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        hit = load_voice(VoiceStore().get(name), engine, ReferenceSettings(), ReferenceCache())
        warm.append(time.perf_counter() - start)
        assert hit.cache_hit
    return {"cold_s": min(cold), "warm_s": min(warm), "cold_over_warm": min(cold) / min(warm),
            "cold_runs": cold, "warm_runs": warm}


def session(_repeats: int, model: Path) -> dict:
    import psutil

    from companion.config import load_settings
    from companion.engine import Engine
    from companion.session import Session
    from companion.voices import VoiceProfile, VoiceStore

    engine = Engine.load(str(model), max_seq_len=640)
    settings = load_settings()
    settings = settings.model_copy(update={"generation": settings.generation.model_copy(
        update={"max_segment_seconds": 0.8, "seed": None})})
    store = VoiceStore()
    store.add(VoiceProfile(name="guest", audio=[str(DATA / "guest_16k.wav")],
                           transcript_file=str(DATA / "guest.txt")))
    s = Session(engine, settings, None, store)
    s.use_voice("guest")
    words, rss = ["Yes.", "Right.", "Sure.", "Hi.", "Good.", "Fine."], {}
    for turn in range(1, 201):
        list(s.speak(words[turn % len(words)]))
        if turn in (50, 200):
            gc.collect()
            rss[turn] = psutil.Process().memory_info().rss / 2**20
    return {"rss_mb_turn50": rss[50], "rss_mb_turn200": rss[200], "turn200_over_turn50": rss[200] / rss[50]}


def stop(repeats: int, _model: Path) -> dict:
    from pulse import SizeLog, pulse_server, speechlike

    from companion.audio.playback import Player

    returned, silent = [], []
    with pulse_server() as server:
        os.environ["PULSE_SERVER"] = server.server
        import sounddevice as sd

        sd._terminate()
        sd._initialize()
        for i in range(repeats):
            sent, player, result = speechlike(6.0, i), Player().check(), {}

            def play(sent=sent, player=player, result=result) -> None:
                player.play((sent[j : j + 1920] for j in range(0, len(sent), 1920)), expected_seconds=6.0)
                result["returned"] = time.monotonic()

            with server.capture() as cap:
                log = SizeLog(cap.path)
                log.start()
                thread = threading.Thread(target=play)
                thread.start()
                time.sleep(1.0)
                at = time.monotonic()
                player.stop()
                thread.join(30)
                time.sleep(0.5)
                log.done.set()
                log.join()
            captured = cap.audio()
            last = int(np.flatnonzero(np.abs(captured) > 1e-4)[-1])
            returned.append((result["returned"] - at) * 1000)
            silent.append((log.arrival(last) - at) * 1000)
    return {"play_returned_ms": min(returned), "sink_silent_ms": min(silent), "returned_runs": returned,
            "silent_runs": silent}


def ctrl_c(repeats: int, model: Path) -> dict:
    from terminal import COMPANION, Tmux

    home = Path(os.environ["COMPANION_HOME"])
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 12\n")
    env = dict(os.environ, PULSE_SERVER="unix:/nonexistent/native", TERM="xterm-256color", PYTHONPATH=str(ROOT))
    seen = []
    with tempfile.TemporaryDirectory() as cwd:
        term = Tmux([*COMPANION, "chat", "--model", str(model)], env, cwd=Path(cwd))
        try:
            term.wait_for(r"you›", timeout=300)
            for i in range(repeats):
                term.type_line(f"Line number {i} is cancelled.")
                term.wait_for("● generating", timeout=60)
                time.sleep(1.0)
                sent = time.monotonic()
                term.keys("C-c")
                term.wait_for(r"⏹ cancelled \(stopped in \d+ ms\)", timeout=30, count=i + 1, poll=0.005)
                seen.append((time.monotonic() - sent) * 1000)
                term.wait_for(r"│ idle", timeout=30)
        finally:
            term.close()
    return {"prompt_back_ms": min(seen), "runs": seen}


FIGURES: dict[str, Callable[[int, Path], dict]] = {
    "watermark": watermark, "refcache": refcache, "session": session, "stop": stop, "ctrl_c": ctrl_c}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="companion-figures-") as tmp:
        os.environ["COMPANION_HOME"] = str(Path(tmp) / "home")
        os.environ["HOME"] = str(Path(tmp) / "user")
        from companion.testing.tiny_checkpoint import write_tiny_checkpoint

        model = write_tiny_checkpoint(Path(tmp) / "tiny", codebooks=32, seed=0)
        for name in args.only:
            results[name] = FIGURES[name](args.repeats, model)
            print(name, json.dumps(results[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
