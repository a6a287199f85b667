"""`companion serve` under many requests with random hang-ups: does its memory stay flat?

    python benchmarks/serve_soak.py [--model DIR] [--requests 2000] [--every 250] [--seed 1] [--json FILE]

Starts `companion serve` as a subprocess (tiny test checkpoint unless --model; a temporary
COMPANION_HOME; short segments, ``generation.max_segment_seconds: 0.4``, so that a request costs
little; ``serve.max_conversations: 20`` and ``serve.live_conversations: 8`` so that the caps are
crossed many times). Then sends ``--requests`` requests one after another, each drawn at random:

- 30 % speech read to the end (``pcm``, ``wav`` or ``opus``), half of them in one of 40 conversations;
- 25 % speech the client hangs up on after a random number of body bytes (0: before the first audio);
- 15 % ``GET /v1/conversations/ID``, 5 % ``DELETE`` of one;
- 15 % requests refused (nothing to speak, an unknown voice, bad JSON, a body over the limit);
- 10 % ``/health`` and ``/metrics``.

Every ``--every`` requests it reads the server's resident memory (VmRSS, /proc) and reports the
series, the growth over the last half of the run, the counts by kind and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_ttfb import _listening_port

TEXTS = ["Hi there.", "The kettle is on.", "Blue door.", "See you soon.", "One more thing."]


def start(model: str, home: Path) -> tuple[subprocess.Popen[bytes], int]:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.yaml").write_text(
        "generation:\n  max_segment_seconds: 0.4\n  seed: 1\ncontext:\n  max_seq_len: 1024\n"
        "serve:\n  max_conversations: 20\n  live_conversations: 8\n")
    env = dict(os.environ, COMPANION_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("COMPANION_API_KEY", None)
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - the server's stderr, for as long as it runs
    proc = subprocess.Popen([sys.executable, "-m", "companion", "serve", "--port", "0", "--model", model,
                             "--log-level", "warning"], env=env, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return proc, port
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise SystemExit("the server did not start:\n" + (home / "serve.log").read_text())
        time.sleep(0.2)
    raise SystemExit("the server did not get ready in 300 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hang_up(port: int, body: dict[str, object], after: int) -> None:
    """Send a speech request, read ``after`` bytes of the answer (0: none), and close the connection."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as raw:
        raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        got = 0
        while got < after:
            chunk = raw.recv(min(65536, after - got))
            if not chunk:
                break
            got += len(chunk)


def one(client: httpx.Client, port: int, rng: random.Random) -> str:
    roll = rng.random()
    conversation = f"c{rng.randrange(40)}"
    speech = {"model": "csm-1b", "voice": "default", "input": rng.choice(TEXTS),
              "response_format": rng.choice(["pcm", "wav", "opus"])}
    if roll < 0.30:
        if rng.random() < 0.5:
            speech["conversation"] = conversation
        r = client.post("/v1/audio/speech", json=speech)
        return f"speech {r.status_code}"
    if roll < 0.55:
        if rng.random() < 0.5:
            speech["conversation"] = conversation
        hang_up(port, speech, rng.choice([0, 0, 1, 2000, 20000, 60000]))
        return "hang-up"
    if roll < 0.70:
        return f"get {client.get(f'/v1/conversations/{conversation}').status_code}"
    if roll < 0.75:
        return f"delete {client.delete(f'/v1/conversations/{conversation}').status_code}"
    if roll < 0.90:
        bad = rng.choice([{**speech, "input": "..."}, {**speech, "voice": "alloy"}, None, "big"])
        if bad is None:
            r = client.post("/v1/audio/speech", content=b"{nope", headers={"content-type": "application/json"})
        elif bad == "big":
            r = client.post("/v1/audio/speech", content=b"x" * 70000, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/audio/speech", json=bad)
        return f"refused {r.status_code}"
    rng.random()  # (kept: the recorded run drew this number, so that the same seed gives the same requests)
    path = rng.choice(["/health", "/metrics"])
    return f"{path.strip('/')} {client.get(path).status_code}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny test checkpoint, built here)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        model = args.model
        if model is None:
            from companion.testing.tiny_checkpoint import write_tiny_checkpoint

            model = str(write_tiny_checkpoint(Path(tmp) / "tiny", codebooks=32, seed=0))
        proc, port = start(model, home)
        counts: dict[str, int] = {}
        series = [(0, round(rss_mb(proc.pid), 2))]
        started = time.monotonic()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                client.post("/v1/audio/speech", json={"model": "m", "voice": "default", "input": "Hi."})
                for i in range(1, args.requests + 1):
                    kind = one(client, port, rng)
                    counts[kind] = counts.get(kind, 0) + 1
                    if i % args.every == 0:
                        series.append((i, round(rss_mb(proc.pid), 2)))
                        print(f"{i:5d} requests  rss {series[-1][1]:8.2f} MB  {time.monotonic() - started:6.0f} s",
                              flush=True)
                metrics = client.get("/metrics").text
        finally:
            proc.terminate()
            proc.wait(60)
        log_bytes = (home / "serve.log").stat().st_size
    half = [mb for n, mb in series if n >= args.requests // 2]
    results = {"requests": args.requests, "seed": args.seed, "rss_mb": series,
               "growth_last_half_mb": round(half[-1] - half[0], 2) if len(half) > 1 else None,
               "wall_seconds": round(time.monotonic() - started, 1), "counts": dict(sorted(counts.items())),
               "server_log_bytes": log_bytes,
               "errors_500": sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                 if line.startswith("companion_requests_total") and 'status="500"' in line)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
