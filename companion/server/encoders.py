"""Audio chunks -> the bytes of a response format, as the chunks are generated.

``pcm`` (raw 16-bit little-endian mono, 24 kHz), ``wav`` (the same after a header whose sizes say
"unknown length", as streaming WAV servers send it) and ``opus`` (Ogg pages) stream: each chunk's bytes
leave as soon as it is generated. ``flac`` and ``mp3`` are written by libsndfile with a header that
holds the length (FLAC's STREAMINFO, MP3's LAME tag), rewritten when the file is closed: they are sent
once the reply is complete, so that every decoder reads them right.
"""

from __future__ import annotations

import io
import struct
from typing import Protocol

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24000
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
}
FORMATS = tuple(CONTENT_TYPES)
STREAMED = ("pcm", "wav", "opus")  # the formats whose bytes leave chunk by chunk


class Encoder(Protocol):
    def add(self, audio: np.ndarray) -> bytes:
        """Encode `(n,)` float32 samples; returns the bytes ready to send (maybe none)."""
        ...

    def finish(self) -> bytes:
        """The bytes that end the stream."""
        ...


def to_pcm16(audio: np.ndarray) -> bytes:
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (samples * 32767.0).round().astype("<i2").tobytes()


class PcmEncoder:
    def add(self, audio: np.ndarray) -> bytes:
        return to_pcm16(audio)

    def finish(self) -> bytes:
        return b""


class WavEncoder(PcmEncoder):
    """A 44-byte PCM WAV header with the RIFF and data sizes set to 0xFFFFFFFF (length unknown), then PCM."""

    def __init__(self) -> None:
        self._header_sent = False

    def add(self, audio: np.ndarray) -> bytes:
        return self._header() + to_pcm16(audio)

    def finish(self) -> bytes:
        return self._header()

    def _header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                + b"data" + struct.pack("<I", 0xFFFFFFFF))


class _Sink:
    """A write-only file for libsndfile that hands out what was appended since the last ``take``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> int:
        end = self._pos + len(data)
        if end > len(self._buf):
            self._buf.extend(b"\0" * (end - len(self._buf)))
        self._buf[self._pos : end] = data
        self._pos = end
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buf)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        self._pos = 0
        return out


class OpusEncoder:
    """Opus in Ogg pages (libsndfile writes them in order, never going back)."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._file = sf.SoundFile(self._sink, mode="w", samplerate=SAMPLE_RATE, channels=1, format="OGG", subtype="OPUS")

    def add(self, audio: np.ndarray) -> bytes:
        self._file.write(np.asarray(audio, dtype=np.float32))
        return self._sink.take()

    def finish(self) -> bytes:
        self._file.close()
        return self._sink.take()


class WholeFileEncoder:
    """FLAC or MP3: the reply collected, then written as one complete file."""

    def __init__(self, fmt: str) -> None:
        self._format, self._subtype = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}[fmt]
        self._parts: list[np.ndarray] = []

    def add(self, audio: np.ndarray) -> bytes:
        self._parts.append(np.asarray(audio, dtype=np.float32))
        return b""

    def finish(self) -> bytes:
        audio = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)
        out = io.BytesIO()
        sf.write(out, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format=self._format, subtype=self._subtype)
        return out.getvalue()


def make_encoder(fmt: str) -> Encoder:
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "wav":
        return WavEncoder()
    if fmt == "opus":
        return OpusEncoder()
    return WholeFileEncoder(fmt)
