"""`companion serve` against idle and slow connections (issue 20's acceptance 1), timed.

    python benchmarks/serve_limits.py [--model DIR] [--idle 400] [--slow 20] [--watch 35] [--json FILE]

Starts `companion serve` as a subprocess (tiny test checkpoint unless --model; a temporary
COMPANION_HOME; default settings: header_timeout_seconds 10, body_timeout_seconds 20,
keep_alive_seconds 5, max_connections 512) and runs two scenes:

1. ``--idle`` sockets that connect and say nothing, and ``--slow`` senders that drip one byte a
   second (half of them a request's headers, half a body after complete headers). With all of them
   open: the time ``GET /health`` takes on a new connection. Then, ``--watch`` seconds after they
   opened: how many the server has closed.
2. The server started with ``ulimit -n 256`` and 300 idle sockets: whether ``/health`` answers while
   they are open, the time until it answers, and the size of the server's log (stderr) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve_ttfb import _listening_port


def start(model: str, home: Path, log: Path, nofile: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ, COMPANION_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("COMPANION_API_KEY", None)

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "companion", "serve", "--port", "0", "--model", model,
                                 "--log-level", "info"], env=env, stderr=err, preexec_fn=limit)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port and _health(port, 5.0)[0] == 200:
            return proc, port
        if proc.poll() is not None:
            raise SystemExit("the server did not start:\n" + log.read_text())
        time.sleep(0.2)
    raise SystemExit("the server did not get ready in 300 s")


def _health(port: int, timeout: float) -> tuple[int | None, float]:
    start = time.perf_counter()
    try:
        status: int | None = httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).status_code
    except httpx.HTTPError:
        status = None
    return status, time.perf_counter() - start


def _closed(sock: socket.socket) -> bool:
    """True when the server closed ``sock``: an idle socket becomes readable only then (end of stream,
    a reset, or a 408 answer followed by the close)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _drip(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    for i in range(len(data)):
        if stop.is_set():
            return
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return
        stop.wait(1.0)


def scene_one(model: str, home: Path, idle: int, slow: int, watch: float) -> dict[str, object]:
    log = home / "scene1.log"
    proc, port = start(model, home, log)
    stop = threading.Event()
    socks: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(idle):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        head = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Pad: " + b"a" * 60 + b"\r\n\r\n"
        body_head = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n")
        for i in range(slow):
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
            if i % 2:
                s.sendall(body_head)
                data = b'{"input": "' + b"a" * 180 + b'"}'
            else:
                data = head
            threading.Thread(target=_drip, args=(s, data, stop), daemon=True).start()
        status, took = _health(port, 30.0)
        rss_status = Path(f"/proc/{proc.pid}/status").read_text()
        while time.monotonic() - opened < watch:
            time.sleep(0.5)
        closed = sum(_closed(s) for s in socks)
        after_status, after_took = _health(port, 30.0)
        return {"idle": idle, "slow": slow, "health_status_with_all_open": status,
                "health_seconds_with_all_open": round(took, 3),
                "watch_seconds": watch, "closed_by_server": closed, "open": len(socks),
                "closed_share": round(closed / len(socks), 3), "health_after": after_status,
                "health_after_seconds": round(after_took, 3),
                "server_rss_mb": _rss_mb(rss_status), "log_bytes": log.stat().st_size}
    finally:
        stop.set()
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(60)


def scene_two(model: str, home: Path, idle: int = 300, nofile: int = 256) -> dict[str, object]:
    log = home / "scene2.log"
    proc, port = start(model, home, log, nofile=nofile)
    socks: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(idle):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        first_status, _ = _health(port, 2.0)
        answered = None
        while time.monotonic() - opened < 60:
            status, _ = _health(port, 2.0)
            if status == 200:
                answered = time.monotonic() - opened
                break
            time.sleep(0.2)
        time.sleep(2.0)  # anything still being logged
        return {"nofile": nofile, "idle": idle, "health_while_full": first_status,
                "health_answered_after_seconds": None if answered is None else round(answered, 2),
                "closed_by_server": sum(_closed(s) for s in socks), "log_bytes": log.stat().st_size}
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(60)


def _rss_mb(status: str) -> float:
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny test checkpoint, built here)")
    parser.add_argument("--idle", type=int, default=400)
    parser.add_argument("--slow", type=int, default=20)
    parser.add_argument("--watch", type=float, default=35.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        model = args.model
        if model is None:
            from companion.testing.tiny_checkpoint import write_tiny_checkpoint

            model = str(write_tiny_checkpoint(Path(tmp) / "tiny", codebooks=32, seed=0))
        results = {"scene_one": scene_one(model, home, args.idle, args.slow, args.watch),
                   "scene_two": scene_two(model, home)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
