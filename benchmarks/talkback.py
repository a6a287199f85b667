"""Talking back: time from the end of the LLM's first sentence to its first audio chunk.

Runs the real TalkBack + Session + Engine (tiny random checkpoint by default, or ``--random-weights
full``) against a local fake OpenAI-compatible server that streams a three-sentence reply word by
word at ``--token-ms`` per word (an LLM writing at that speed). In the same run, the baseline is the
old way: wait for the whole reply, then speak it. Reported (medians of ``--repeats`` replies, after
one warm-up reply that makes the voice's reference):

  llm first sentence     request -> the LLM's first sentence complete
  sentence -> audio      end of that sentence -> its first audio chunk (what talking back adds)
  engine first audio     the engine's own time to first audio for that sentence (session stats)
  first audio            request -> first audio chunk, streamed vs whole-reply baseline (and their ratio)

    flock /work/wt/heavy.lock python benchmarks/talkback.py [--repeats 5] [--token-ms 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = ("Sure, I can help with that. The weather today looks calm and mild in most places. "
         "Take a light jacket if you go out this evening.")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = REPLY.split(" ")
        for i, word in enumerate(words):
            time.sleep(self.server.token_s)  # the LLM writing (the bench's pacing, not a test)
            piece = word if i == 0 else " " + word
            self._send({"choices": [{"delta": {"content": piece}}]})
        self._send({"choices": [{"delta": {}, "finish_reason": "stop"}]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send(self, data: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token_s = token_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-weights", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--token-ms", type=float, default=30.0, help="how fast the fake LLM writes (ms per word)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    os.environ.setdefault("COMPANION_HOME", tempfile.mkdtemp(prefix="companion-bench-home-"))

    import torch

    from companion.config import LLMSettings, load_settings
    from companion.engine import bench
    from companion.llm import LLMClient
    from companion.session import Session
    from companion.talkback import TalkBack
    from companion.voices import VoiceStore

    server = _Server(args.token_ms / 1000)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with tempfile.TemporaryDirectory(prefix="companion-bench-") as work:
        engine, label = bench.random_engine(args.random_weights, torch.device("cpu"), torch.float32, work)
        settings = load_settings(overrides={"generation": {"seed": 1}, "watermark": {"enabled": False}})
        session = Session(engine, settings, None, VoiceStore())
        client = LLMClient(LLMSettings(enabled=True, base_url=base_url, model="bench", api_key_env=""))
        talk = TalkBack(session, client, lambda: "be brief")
        list(talk.reply("warm up"))  # the voice's reference is made by the first reply
        streamed, whole = [], []
        for _ in range(args.repeats):
            session.clear()
            start = time.monotonic()
            reply = talk.reply("What is the weather like?")
            chunks = iter(reply)
            next(chunks)
            first_audio = time.monotonic() - start
            for _chunk in chunks:
                pass
            t = reply.timing
            streamed.append({"llm_first_sentence_s": t.first_sentence_s, "sentence_to_audio_s": t.sentence_to_audio_s,
                             "engine_first_audio_s": t.engine_first_audio_s, "first_audio_s": first_audio})
            session.clear()
            start = time.monotonic()  # the baseline: the whole reply first, then speech
            text = "".join(client.reply([{"role": "user", "content": "What is the weather like?"}]))
            gen = session.speak(text)
            next(gen)
            whole.append(time.monotonic() - start)
            for _chunk in gen:
                pass
        session.close()
    server.shutdown()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in streamed)

    results = {
        "model": label, "repeats": args.repeats, "token_ms": args.token_ms, "threads": torch.get_num_threads(),
        "llm_first_sentence_s": med("llm_first_sentence_s"), "sentence_to_audio_s": med("sentence_to_audio_s"),
        "engine_first_audio_s": med("engine_first_audio_s"), "first_audio_streamed_s": med("first_audio_s"),
        "first_audio_whole_reply_s": statistics.median(whole),
    }
    results["first_audio_ratio"] = results["first_audio_streamed_s"] / results["first_audio_whole_reply_s"]
    print(f"talking back on {label}, fake LLM at {args.token_ms:g} ms/word, median of {args.repeats}")
    for key, value in results.items():
        if key.endswith("_s"):
            print(f"  {key:<28} {value * 1000:8.0f} ms")
    print(f"  first audio, streamed / whole reply: {results['first_audio_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
