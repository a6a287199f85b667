"""Time to first byte over HTTP next to the engine's own first audio, in the same run.

    python benchmarks/serve_ttfb.py [--model DIR] [--runs N] [--format pcm] [--threads 1] [--json FILE]

Starts `companion serve` (a subprocess on a free loopback port, in a temporary COMPANION_HOME; the tiny
test checkpoint unless --model is given), makes the voice's reference, then for each run sends one
speech request and measures on the client the time from sending it to the first body byte. For the
same request the server's /metrics give the engine's time from its call to its first audio chunk
(``companion_engine_first_audio_seconds``) and the server's own time from receiving the request to
handing the first bytes to the connection (``companion_time_to_first_byte_seconds``): each run reads
their sums before and after, so every number belongs to that one request. Reported: medians (and all
runs) of

    http_ttfb_ms      client: request sent -> first body byte
    server_ttfb_ms    server: request received -> first bytes handed to the connection
    engine_first_ms   engine: its call -> its first audio chunk (prefill + first frames + decode)
    added_ms          http_ttfb_ms - engine_first_ms: what the server adds (HTTP, queue, session, encoding)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

TEXT = "The kettle is on."


def metric_sum(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{name}_sum (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_server(model: str, home: Path, threads: int) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = dict(os.environ, COMPANION_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    env.pop("COMPANION_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "companion", "serve", "--port", "0", "--model", model,
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # uvicorn's own line is quiet at --log-level warning: find the port from the process's sockets
        port = _listening_port(proc.pid)
        if port:
            return proc, f"http://127.0.0.1:{port}", lines
        if proc.poll() is not None:
            raise SystemExit("the server did not start:\n" + "".join(lines))
        time.sleep(0.1)
    raise SystemExit("the server did not start in 300 s")


def _listening_port(pid: int) -> int | None:
    import psutil

    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return None
    ports = [c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN]
    return ports[0] if ports else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny test checkpoint, built here)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--format", default="pcm", choices=["pcm", "wav", "opus"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the server's torch (default 1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="companion-serve-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / "config").mkdir(parents=True)
        (home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 4\ncontext:\n  max_seq_len: 1024\n")
        model = args.model
        if model is None:
            from companion.testing.tiny_checkpoint import write_tiny_checkpoint

            model = str(write_tiny_checkpoint(Path(tmp) / "tiny", codebooks=32, seed=0))
        proc, url, _ = start_server(model, home, args.threads)
        try:
            result = measure(url, args.runs, args.format)
        finally:
            proc.terminate()
            proc.wait(60)
    result["model"] = args.model or "tiny (random weights)"
    result["threads"] = args.threads
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def measure(url: str, runs: int, fmt: str) -> dict:
    client = httpx.Client(base_url=url, timeout=300)
    while client.get("/health").status_code != 200:
        time.sleep(0.2)
    body = {"model": "csm-1b", "voice": "default", "input": TEXT, "response_format": fmt}
    for _ in range(3):  # the voice's reference, then warm caches
        client.post("/v1/audio/speech", json=body).raise_for_status()
    rows = []
    for _ in range(runs):
        engine0 = metric_sum(client, "companion_engine_first_audio_seconds")
        server0 = metric_sum(client, "companion_time_to_first_byte_seconds")
        start = time.perf_counter()
        with client.stream("POST", "/v1/audio/speech", json=body) as response:
            response.raise_for_status()
            pieces = response.iter_raw()
            next(pieces)
            http_ms = (time.perf_counter() - start) * 1000
            for _ in pieces:
                pass
        engine_ms = (metric_sum(client, "companion_engine_first_audio_seconds") - engine0) * 1000
        server_ms = (metric_sum(client, "companion_time_to_first_byte_seconds") - server0) * 1000
        rows.append({"http_ttfb_ms": http_ms, "server_ttfb_ms": server_ms, "engine_first_ms": engine_ms,
                     "added_ms": http_ms - engine_ms})
    client.close()
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    return {"format": fmt, "runs_count": runs, "median": med, "runs": rows}


if __name__ == "__main__":
    raise SystemExit(main())
