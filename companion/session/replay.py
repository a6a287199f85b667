"""An engine stand-in for a batch that resumes: it hands recorded takes back instead of generating.

``Takes`` wraps the real engine (everything but ``stream`` passes through). While it holds queued
takes, each ``stream`` call returns the next one's chunks (the codes and audio the model made in the
earlier run) after checking that it is the same segment (speaker and text); otherwise it streams from
the engine and records what it yields. The session above it does exactly what it did the first time
(the same budget, pruning, voices, watermark and history), so the lines after the replayed ones hear
the same conversation and come out the same for the same seed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from companion.engine import AudioChunk, GenerationOptions, Segment
from companion.errors import CompanionError

Take = tuple[int, str, list[tuple[np.ndarray, np.ndarray]]]  # (speaker, text, [(codes (K, f), audio (n,))])


class Takes:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.queue: deque[Take] = deque()  # takes to hand back, in order
        self.recorded: list[Take] = []  # the segments streamed since ``recorded`` was last emptied

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def replay(self, takes: list[Take]) -> None:
        self.queue.extend(takes)

    def stream(self, context: list[Segment], speaker: int, text: str, opts: GenerationOptions,
               cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        if self.queue:
            take = self.queue.popleft()
            if (take[0], take[1]) != (speaker, text):
                raise CompanionError(
                    f"the recorded take of {take[1]!r} does not follow on from this script: pass --force to render "
                    "everything again")
            for codes, audio in take[2]:
                yield AudioChunk(audio.copy(), torch.from_numpy(codes.copy()))
            self.recorded.append(take)
            return
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        for chunk in self.engine.stream(context, speaker, text, opts, cancel):
            chunks.append((chunk.codes.to("cpu", torch.int64).numpy().copy(), np.asarray(chunk.audio, np.float32).copy()))
            yield chunk
        self.recorded.append((speaker, text, chunks))
