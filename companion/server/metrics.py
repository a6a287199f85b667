"""The server's counters, written in the Prometheus text format (``GET /metrics``).

Kept by hand (a few counters and two histograms) rather than through a client library: the core
install stays small and the output is the plain exposition format any Prometheus scrapes.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Thread-safe: the event loop and the speech worker both write here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status)
        self.errors: Counter[str] = Counter()  # kind
        self.cancelled = 0  # generations stopped before their end (client gone, shutdown)
        self.disconnects = 0  # clients that hung up before the reply was complete
        self.chunks = 0  # audio chunks generated
        self.audio_seconds = 0.0
        self.ttfb = Histogram(TTFB_BUCKETS)  # request received -> first audio bytes handed to the connection
        self.engine_first_audio = Histogram(TTFB_BUCKETS)  # the engine's own: its call -> its first chunk
        self.rtf = Histogram(RTF_BUCKETS)  # generation wall time / audio time, per reply

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            getattr(self, name).observe(value)

    def render(self, queue_depth: int, generating: int, ready: bool, refused: tuple[int, int] = (0, 0),
               streams: tuple[int, int] = (0, 1)) -> str:
        """The Prometheus text; ``refused``: connections reset over the cap, and closed for slow headers;
        ``streams``: the replies generated together now, and the most that can be (``engine.max_batch``)."""
        active, most = streams
        with self._lock:
            lines: list[str] = []
            metric = _writer(lines)
            metric("companion_ready", "gauge", "1 once the model is loaded", [f"companion_ready {int(ready)}"])
            metric("companion_requests_total", "counter", "HTTP requests by route and status",
                   [f'companion_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())])
            metric("companion_errors_total", "counter", "failed requests by kind",
                   [f'companion_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())])
            metric("companion_queue_depth", "gauge", "speech requests waiting for the engine",
                   [f"companion_queue_depth {queue_depth}"])
            metric("companion_generating", "gauge", "requests being served now (0 to engine.max_batch)",
                   [f"companion_generating {generating}"])
            metric("companion_streams_active", "gauge", "replies being spoken together now (one engine stream each)",
                   [f"companion_streams_active {active}"])
            metric("companion_streams_max", "gauge", "the most replies generated together (engine.max_batch)",
                   [f"companion_streams_max {most}"])
            metric("companion_batch_occupancy", "gauge", "replies generated together now / engine.max_batch (0 to 1)",
                   [f"companion_batch_occupancy {active / max(1, most):.3f}"])
            metric("companion_generations_cancelled_total", "counter", "generations stopped before their end",
                   [f"companion_generations_cancelled_total {self.cancelled}"])
            metric("companion_client_disconnects_total", "counter", "clients that hung up before the reply ended",
                   [f"companion_client_disconnects_total {self.disconnects}"])
            metric("companion_connections_refused_total", "counter",
                   "connections closed unanswered: over serve.max_connections, or headers not sent in time",
                   [f'companion_connections_refused_total{{reason="over_limit"}} {refused[0]}',
                    f'companion_connections_refused_total{{reason="slow_headers"}} {refused[1]}'])
            metric("companion_audio_chunks_total", "counter", "audio chunks generated",
                   [f"companion_audio_chunks_total {self.chunks}"])
            metric("companion_audio_seconds_total", "counter", "seconds of audio generated",
                   [f"companion_audio_seconds_total {self.audio_seconds:.3f}"])
            metric("companion_time_to_first_byte_seconds", "histogram",
                   "request received to the first audio bytes sent", self.ttfb.lines("companion_time_to_first_byte_seconds"))
            metric("companion_engine_first_audio_seconds", "histogram",
                   "the engine's time from its call to its first audio chunk",
                   self.engine_first_audio.lines("companion_engine_first_audio_seconds"))
            metric("companion_real_time_factor", "histogram", "generation time / audio time per reply (below 1: faster)",
                   self.rtf.lines("companion_real_time_factor"))
            return "\n".join(lines) + "\n"


def _writer(lines: list[str]) -> Callable[[str, str, str, list[str]], None]:
    def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    return metric
