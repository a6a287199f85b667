"""A private PulseAudio server with a null sink, for tests that play real audio.

Follows ../shared/notes/real-audio-in-ci.md: user-mode pulseaudio in a private dir (mode 700), a
24 kHz mono float32 null sink as the default, a `pacat` keep-alive so the monitor does not lose the
start of each playback, and `parec` capturing the monitor into a FILE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RATE = 24000
SINK = "test_sink"
RAW = ["--raw", "--format=float32le", f"--rate={RATE}", "--channels=1", "--latency-msec=20"]


def pulseaudio_missing() -> str | None:
    """Why a pulse test cannot run here (None when it can)."""
    for tool in ("pulseaudio", "pactl", "pacat", "parec"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install pulseaudio pulseaudio-utils libasound2-plugins)"
    return None


@dataclass
class PulseServer:
    dir: Path
    env: dict[str, str]
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def server(self) -> str:
        return self.env["PULSE_SERVER"]

    def pactl(self, *args: str) -> str:
        out = subprocess.run(["pactl", *args], env=self.env, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"pactl {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record what reaches the sink (its monitor) while the block runs."""
        path = self.dir / f"capture-{time.monotonic_ns()}.raw"
        with path.open("wb") as f:
            proc = subprocess.Popen(["parec", "-d", "@DEFAULT_MONITOR@", *RAW], stdout=f, env=self.env)
        cap = Capture(path)
        _wait_for_data(path, proc)  # parec connected and streaming before the block plays anything
        try:
            yield cap
        finally:
            time.sleep(0.3)  # let the tail reach the monitor
            proc.terminate()
            proc.wait(timeout=5)
            cap.samples = np.fromfile(path, dtype="<f4")


@dataclass
class Capture:
    path: Path
    samples: np.ndarray | None = None  # read when the capture ends (the server's dir goes away with it)

    def audio(self) -> np.ndarray:
        return self.samples if self.samples is not None else np.fromfile(self.path, dtype="<f4")


@contextmanager
def pulse_server() -> Iterator[PulseServer]:
    """Start a private pulseaudio with a null sink; stop it and remove its dir afterwards."""
    d = Path(tempfile.mkdtemp(prefix="companion-pulse-"))
    d.chmod(0o700)
    env = dict(os.environ)
    env.update(PULSE_SERVER=f"unix:{d}/native", PULSE_RUNTIME_PATH=str(d), PULSE_STATE_PATH=str(d),
               XDG_RUNTIME_DIR=str(d))
    server = PulseServer(d, env)
    started = False
    try:
        subprocess.run(
            ["pulseaudio", "-n", "-D", "--exit-idle-time=-1", f"--log-target=file:{d}/pulse.log",
             f"--load=module-native-protocol-unix socket={d}/native auth-anonymous=1",
             f"--load=module-null-sink sink_name={SINK} rate={RATE} channels=1 format=float32le"],
            env=env, check=True, timeout=20,
        )
        started = True
        _wait_ready(server)
        server.pactl("set-default-sink", SINK)
        server.pactl("set-default-source", f"{SINK}.monitor")
        keep_alive = subprocess.Popen(["pacat", "-p", "-d", SINK, *RAW, "/dev/zero"], env=env)
        server._procs.append(keep_alive)
        yield server
    finally:
        for proc in server._procs:
            proc.terminate()
            proc.wait(timeout=5)
        if started:
            subprocess.run(["pactl", "exit"], env=env, capture_output=True, timeout=10)
        shutil.rmtree(d, ignore_errors=True)


class SizeLog(threading.Thread):
    """(time, bytes) of the capture file every 2 ms: when each captured sample arrived."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.points, self.done = path, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.points.append((time.monotonic(), self.path.stat().st_size))
            time.sleep(0.002)

    def arrival(self, sample: int) -> float:
        for t, size in self.points:
            if size // 4 > sample:
                return t
        return float("nan")


def _wait_for_data(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.stat().st_size < RATE * 4 // 5:  # 200 ms of samples
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"parec produced no audio (exit code {proc.poll()})")
        time.sleep(0.02)


def _wait_ready(server: PulseServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["pactl", "info"], env=server.env, capture_output=True, timeout=5).returncode == 0:
            return
        time.sleep(0.05)
    log = (server.dir / "pulse.log").read_text(errors="replace")[-2000:] if (server.dir / "pulse.log").exists() else ""
    raise RuntimeError(f"pulseaudio did not answer within {timeout} s: {log}")


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp (180 Hz rising 120 Hz/s) with a syllable-rate envelope and some noise: no lag looks like another."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * (180 * t + 60 * t**2)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * tone + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


@dataclass
class Heard:
    """What a listener at the sink heard of ``sent``: the shape, the level and the length."""

    correlation: float  # normalized cross-correlation at the best lag
    level_db: float  # RMS of the captured audio over RMS of the sent audio, at that lag
    length_diff: int  # samples heard (silence trimmed) minus samples sent (silence trimmed)

    def __str__(self) -> str:
        return f"correlation {self.correlation:.4f}, level {self.level_db:+.2f} dB, length {self.length_diff:+d} samples"

    def ok(self) -> bool:
        """The acceptance: correlation > 0.99, level within 0.5 dB, length within one frame (1920 samples)."""
        return self.correlation > 0.99 and abs(self.level_db) <= 0.5 and abs(self.length_diff) <= FRAME


FRAME = 1920  # one Mimi frame (80 ms)


def heard(captured: np.ndarray, sent: np.ndarray) -> Heard:
    corr, lag = best_correlation(captured, sent)
    window = captured[lag : lag + len(sent)]
    rms_c = float(np.sqrt(np.mean(np.square(window, dtype=np.float64)))) if len(window) else 0.0
    rms_s = float(np.sqrt(np.mean(np.square(sent[: len(window)], dtype=np.float64)))) if len(window) else 0.0
    level = 20 * np.log10(max(rms_c, 1e-12) / max(rms_s, 1e-12))
    return Heard(corr, float(level), len(trim_silence(captured)) - len(trim_silence(sent)))


def trim_silence(x: np.ndarray, threshold: float = 1e-4) -> np.ndarray:
    """The span between the first and last sample above threshold."""
    idx = np.flatnonzero(np.abs(x) > threshold)
    return x[idx[0] : idx[-1] + 1] if idx.size else x[:0]


def best_correlation(captured: np.ndarray, sent: np.ndarray) -> tuple[float, int]:
    """Normalized cross-correlation of ``sent`` against ``captured`` at the best lag (FFT), and that lag."""
    n = len(captured) + len(sent)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(captured, size) * np.conj(np.fft.rfft(sent, size)), size)[: len(captured)]
    lag = int(np.argmax(corr))
    window = captured[lag : lag + len(sent)]
    denom = float(np.linalg.norm(window) * np.linalg.norm(sent[: len(window)])) or 1.0
    return float(np.dot(window, sent[: len(window)]) / denom), lag
