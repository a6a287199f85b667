"""``Engine``: the one object the rest of companion talks to (see docs/architecture.md)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from companion.engine.batching import Batcher
from companion.engine.cuda_graphs import Capture, FrameGraphs, default_capture
from companion.engine.errors import ContextTooLong, EngineBusy
from companion.engine.frames import FrameLoop
from companion.engine.fused import FUSION, Fusion, check_compiler_early, compile_wanted, use_compile_cache
from companion.engine.loading import load_csm, resolve_model_dir, select_device, select_dtype
from companion.engine.mimi_stream import MimiStreamDecoder
from companion.engine.prompt import PromptBuilder
from companion.engine.sampling import Sampler
from companion.engine.types import AudioChunk, EngineStats, GenerationOptions, Segment
from companion.paths import get_paths

SAMPLES_PER_FRAME = 1920
# Frames per yielded chunk: the first chunk comes quickly, later ones are larger (less decode overhead).
CHUNK_SCHEDULE = (2, 4, 8)
CHUNK_FRAMES_LATER = 10


def chunk_sizes() -> Iterator[int]:
    """2, 4, 8, then 10 frames per chunk forever."""
    yield from CHUNK_SCHEDULE
    while True:
        yield CHUNK_FRAMES_LATER


class Engine:
    """CSM-1B generation: prompt positions, streaming audio, prefix reuse.

    With ``max_batch`` 1 (the default) one stream is live at a time, generated in the caller's thread.
    With more, up to ``max_batch`` streams, each consumed by its own thread, share one frame loop
    (``batching.py``)."""

    sample_rate: int = 24000
    frame_rate: float = 12.5

    def __init__(
        self,
        model: Any,
        processor: Any,
        model_key: str,
        max_seq_len: int = 4096,
        capture: Capture | None = None,
        max_batch: int = 1,
        fusion: Fusion | None = None,
    ) -> None:
        """``capture``: how frames are recorded for replay (default: CUDA graphs on CUDA, none elsewhere).
        ``max_batch``: how many streams may be generated at once (each from its own thread).
        ``fusion``: compile the frame (``fused.py``; the process's is ``fused.FUSION``), None: don't. Without
        a capture, compiled frames run eagerly (a CPU), and only while compiling works."""
        self.model = model
        self.processor = processor
        self.model_key = model_key
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.num_codebooks: int = model.config.num_codebooks
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.prompt = PromptBuilder(processor.tokenizer, self.num_codebooks)
        self.loop = FrameLoop(model, max_seq_len, slots=max_batch)
        capture = capture if capture is not None else default_capture(self.device)
        self.fusion = fusion
        if capture is None and fusion is not None:
            self.graphs: FrameGraphs | None = FrameGraphs(self.loop, Capture(), fusion, fused_only=True)
        else:
            self.graphs = FrameGraphs(self.loop, capture, fusion) if capture is not None else None
        # Mimi in float32 on every device: bf16 convolutions are slow on CPUs, lose precision on GPUs, and
        # Mimi is a small share of the weights (``load`` keeps the checkpoint's float32 codec weights).
        # Reference codes are cached under ``codec_key``: what the codec is (dtype, device, weights).
        model.codec_model.float()
        self.codec_key = codec_key(model.codec_model)
        self.mimi = MimiStreamDecoder(model.codec_model)
        self._decoders = [self.mimi]  # one per slot, made when a slot is first used
        # Codes >= this cannot be decoded by Mimi: never sample them (None when every code is decodable).
        self.decodable_codes = self.loop.decodable_codes
        self._stats = threading.local()
        self._live: str | None = None  # the stream being generated (its text), None between streams
        self.batcher = Batcher(self) if max_batch > 1 else None

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until frames compiling beside generation (``fused.py``) are done; whether they all were
        within ``timeout`` seconds (None: no limit). The next turn then uses them."""
        return self.graphs.wait_compiled(timeout) if self.graphs is not None else True

    def sibling(self, max_batch: int) -> Engine:
        """Another engine on the same weights (and the same way of recording frames), taking ``max_batch``
        streams at once: its own caches, prefix records and graphs."""
        graphs = self.graphs
        capture = graphs.capture if graphs is not None and not graphs.fused_only else None
        return Engine(self.model, self.processor, self.model_key, self.max_seq_len, capture=capture,
                      max_batch=max_batch, fusion=self.fusion)  # fmt: skip

    @property
    def last_stats(self) -> EngineStats:
        """Timings of the last stream started from the calling thread."""
        stats = getattr(self._stats, "last", None)
        return stats if stats is not None else EngineStats()

    @last_stats.setter
    def last_stats(self, stats: EngineStats) -> None:
        self._stats.last = stats

    @property
    def active_streams(self) -> int:
        """Streams live now (being generated, or waiting for their prompt to be read)."""
        if self.batcher is not None:
            return self.batcher.active
        return int(self._live is not None)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_seq_len: int = 4096,
        max_batch: int = 1,
        compile: str = "off",
    ) -> Engine:
        """Load from a hub id (downloaded into the HF cache when needed) or a local directory.
        ``compile``: ``engine.compile`` (auto, on or off), whether frames are compiled."""
        dev = select_device(device)
        fusion = fusion_for(compile, dev)
        path, key = resolve_model_dir(model, revision)
        csm, processor = load_csm(Path(path), dev, select_dtype(dtype, dev))
        return cls(csm, processor, key, max_seq_len=max_seq_len, max_batch=max_batch, fusion=fusion)

    # ---- audio <-> codes ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """`(n,)` float32 24 kHz mono -> `(K, T)` int64 codes on CPU (T as the processor counts frames)."""
        codec = self.model.codec_model
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=self.device)[None, None]
        codes = codec.encode(x.to(codec.dtype)).audio_codes[0]  # (K, T')
        frames = int(codec.get_encoded_length(torch.tensor(x.shape[-1])))
        return codes[:, :frames].to("cpu", torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """`(K, T)` codes -> `(T * 1920,)` float32 audio (whole-segment Mimi decode)."""
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        audio = self.model.codec_model.decode(codes.to(self.device)[None]).audio_values[0, 0]
        return np.clip(audio.float().cpu().numpy(), -1.0, 1.0)

    # ---- positions ------------------------------------------------------------------------------

    def text_positions(self, speaker: int, text: str) -> int:
        """Positions ``[speaker]text`` takes (with its begin and end tokens)."""
        return self.prompt.text_positions(speaker, text)

    def segment_positions(self, seg: Segment) -> int:
        """Text positions + audio frames + 1 end frame (when the segment has codes)."""
        return self.prompt.segment_positions(seg)

    # ---- generation -----------------------------------------------------------------------------

    def stream(
        self,
        context: list[Segment],
        speaker: int,
        text: str,
        options: GenerationOptions,
        cancel: threading.Event | None = None,
    ) -> Generator[AudioChunk, None, None]:
        """Speak ``text`` as ``speaker`` after ``context``; yield audio chunks while generating.

        Raises ContextTooLong before any work when the prompt and ``options.max_frames`` do not fit, and
        EngineBusy when another stream of this engine is live (started, and not yet finished or closed):
        the caches, the prefix record and the decoder state belong to one stream at a time.
        """
        if self.batcher is None and self._live is not None:
            raise EngineBusy(self._live)
        if self.batcher is not None and self.batcher.active >= self.max_batch:
            self.batcher.open_check()
        rows = self.prompt.prompt_rows(context, speaker, text)
        needed = len(rows) + options.max_frames
        if needed > self.max_seq_len:
            raise ContextTooLong(needed, self.max_seq_len, len(rows), options.max_frames)
        if self.batcher is not None:
            return self._generate_together(rows, options, cancel, _describe(text))
        return self._generate(rows, options, cancel, _describe(text))

    def _generate(
        self, rows: torch.Tensor, options: GenerationOptions, cancel: threading.Event | None, name: str
    ) -> Generator[AudioChunk, None, None]:
        # The engine is this stream's from its first step until it ends, fails or is closed.
        if self._live is not None:
            raise EngineBusy(self._live)
        self._live = name
        try:
            yield from self._speak(rows, options, cancel)
        finally:
            self._live = None

    def _speak(
        self, rows: torch.Tensor, options: GenerationOptions, cancel: threading.Event | None
    ) -> Iterator[AudioChunk]:
        stats = self.last_stats = EngineStats(prompt_positions=len(rows))
        start = time.perf_counter()
        # Step 1: prefill what the cache does not hold yet (nothing more when cancelled meanwhile).
        hidden, stats.prefill_positions = self.loop.prefill(rows, cancel)
        self.sync()
        stats.prefill_ms = (time.perf_counter() - start) * 1000
        if hidden is None:
            return
        # Step 2: generate frames (replayed graphs when available), decoding them in growing chunks.
        self.mimi.reset()
        sizes, pending, gen_s = chunk_sizes(), [], 0.0
        want = next(sizes)
        frames = self._frames(hidden, options, cancel)
        while True:
            t = time.perf_counter()
            frame = next(frames, None)
            gen_s += time.perf_counter() - t
            if frame is not None:
                pending.append(frame)
                stats.frames += 1
                stats.ms_per_frame = gen_s * 1000 / stats.frames  # kept current if the caller stops early
            if cancel is not None and cancel.is_set():
                return  # a cancelled call yields nothing more, not even the frames already made
            if pending and (frame is None or len(pending) >= want):
                yield self._chunk(torch.stack(pending, dim=1), stats, start)
                if self.graphs is not None and stats.frames == len(pending):  # the first audio is out
                    self.graphs.start_wanted()
                pending, want = [], next(sizes)
            if frame is None:
                break

    def _frames(
        self, hidden: torch.Tensor, options: GenerationOptions, cancel: threading.Event | None
    ) -> Iterator[torch.Tensor]:
        """Frames `(K,)` after the prompt whose last hidden state is `(1, 1, H)` ``hidden``."""
        o = options
        if self.graphs is not None:
            graphed = self.graphs.frames(hidden, o.temperature, o.topk, o.seed, o.max_frames, cancel)
            if graphed is not None:
                return graphed
        sampler = Sampler(o.temperature, o.topk, o.seed, self.device, self.num_codebooks, self.decodable_codes,
                          vocab=self.loop.vocab)
        return self.loop.frames(hidden, sampler, o.max_frames, cancel)

    def _chunk(
        self, codes: torch.Tensor, stats: EngineStats, start: float, mimi: MimiStreamDecoder | None = None
    ) -> AudioChunk:
        """Decode `(K, f)` new frames with the streaming Mimi decoder (slot 0's unless ``mimi``)."""
        t = time.perf_counter()
        with torch.no_grad():
            decoder = mimi if mimi is not None else self.mimi
            audio = np.clip(decoder.decode(codes), -1.0, 1.0).astype(np.float32, copy=False)
        stats.decode_ms += (time.perf_counter() - t) * 1000
        if stats.first_audio_ms is None:
            stats.first_audio_ms = (time.perf_counter() - start) * 1000
        return AudioChunk(audio=audio, codes=codes.cpu())

    def _generate_together(
        self, rows: torch.Tensor, options: GenerationOptions, cancel: threading.Event | None, name: str
    ) -> Generator[AudioChunk, None, None]:
        """One stream of several (``max_batch`` > 1): the frame thread makes its frames, this generator
        (in the consumer's thread) decodes them in growing chunks, as ``_speak`` does for one."""
        assert self.batcher is not None
        stats = self.last_stats = EngineStats(prompt_positions=len(rows))
        start = time.perf_counter()
        stream = self.batcher.open(rows, options, cancel, name)
        try:
            kind, value = stream.events.get()
            stats.prefill_ms = (time.perf_counter() - start) * 1000
            if kind == "error":
                raise value
            stats.prefill_positions = value if kind in ("prefilled", "stopped") else 0
            if kind != "prefilled":
                return
            mimi = self._decoder(stream.slot)
            mimi.reset()
            sizes, pending, gen_s = chunk_sizes(), [], 0.0
            want = next(sizes)
            while True:
                t = time.perf_counter()
                kind, value = stream.events.get()
                gen_s += time.perf_counter() - t
                if kind == "error":
                    raise value
                frame = value if kind == "frame" else None
                if frame is not None:
                    pending.append(frame)
                    stats.frames += 1
                    stats.ms_per_frame = gen_s * 1000 / stats.frames
                if cancel is not None and cancel.is_set():
                    return  # a cancelled call yields nothing more, not even the frames already made
                if pending and (frame is None or len(pending) >= want):
                    yield self._chunk(torch.stack(pending, dim=1), stats, start, mimi)
                    pending, want = [], next(sizes)
                if frame is None:
                    break
        finally:
            self.batcher.leave(stream)

    def _decoder(self, slot: int) -> MimiStreamDecoder:
        """The streaming Mimi decoder of ``slot`` (each slot's stream keeps its own decoder state)."""
        while len(self._decoders) <= slot:
            self._decoders.append(MimiStreamDecoder(self.model.codec_model))
        return self._decoders[slot]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def fusion_for(setting: str, device: torch.device) -> Fusion | None:
    """The process's ``Fusion`` when ``engine.compile`` (auto, on, off) wants compiled frames on ``device``
    (compiled code cached under companion's cache directory), else None."""
    if not compile_wanted(setting, device):
        return None
    use_compile_cache(get_paths().cache_dir)
    check_compiler_early(device)
    return FUSION


def _describe(text: str, width: int = 40) -> str:
    """How a live stream is named in EngineBusy: its text, shortened."""
    short = " ".join(text.split())
    return repr(short if len(short) <= width else short[: width - 1] + "\u2026")


def codec_key(codec: torch.nn.Module, samples: int = 256) -> str:
    """What the codec is, for the reference cache: its dtype, device and a fingerprint of its weights.

    The fingerprint hashes every tensor's name, shape and dtype and ``samples`` evenly spaced values of
    it: codecs with other weights (another checkpoint, or the same one rounded to bf16 and back) differ
    in nearly every value, so they never share a key; hashing a sample keeps start-up fast."""
    digest = hashlib.sha256()
    state = codec.state_dict()
    picks = []
    for name, tensor in state.items():
        flat = tensor.detach().reshape(-1)
        picks.append(flat[:: max(1, flat.numel() // samples)][:samples].cpu().to(torch.float64))  # MPS has no float64
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    if picks:
        digest.update(torch.cat(picks).numpy().tobytes())
    weight = next((t for t in state.values() if t.is_floating_point()), None)
    dtype = str(weight.dtype).removeprefix("torch.") if weight is not None else "none"
    device = weight.device.type if weight is not None else "cpu"
    return f"mimi {dtype} {device} {digest.hexdigest()[:16]}"
