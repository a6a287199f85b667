"""Encoded-reference cache with the real tiny engine: hits skip the codec, any key part change misses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from companion.config import ReferenceSettings
from companion.engine import Engine
from companion.paths import get_paths
from companion.refcache import ReferenceCache
from companion.voices import VoiceProfile, VoiceStore, load_voice


class CountingEngine(Engine):
    """The real engine, counting how often its codec encoder runs."""

    encode_calls = 0

    def encode(self, audio: np.ndarray) -> torch.Tensor:
        self.encode_calls += 1
        return super().encode(audio)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> CountingEngine:
    return CountingEngine.load(str(tiny_model_dir), device="cpu")


@pytest.fixture
def counting(engine: CountingEngine) -> CountingEngine:
    engine.encode_calls = 0
    return engine


def _profile(name: str, source: Path, transcript_file: Path) -> VoiceProfile:
    """A saved user profile whose audio is a copy in the user's clone_files (so tests may edit it)."""
    clone_dir = get_paths().clone_dir
    clone_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, clone_dir / source.name)
    profile = VoiceProfile(name=name, audio=source.name, transcript=transcript_file.read_text(encoding="utf-8"))
    VoiceStore().add(profile)
    return VoiceStore().get(name)


def test_second_load_skips_the_decoder_and_the_codec(data_dir: Path, counting: CountingEngine) -> None:
    """Counted, not timed: the codec runs once and the hit decodes no audio (the speed-up is in
    benchmarks/unit_figures.py and docs/benchmarks.md)."""
    profile = _profile("reader", data_dir / "narrator.mp3", data_dir / "narrator.txt")
    settings = ReferenceSettings()

    first = load_voice(profile, counting, settings, ReferenceCache())
    cache = ReferenceCache()  # a new session: a new cache object over the same folder
    second = load_voice(VoiceStore().get("reader"), counting, settings, cache)

    assert counting.encode_calls == 1
    assert (first.cache_hit, second.cache_hit) == (False, True) and (cache.hits, cache.misses) == (1, 0)
    assert first.audio is not None and second.audio is None  # nothing was decoded on the hit
    assert second.codes is not None and first.codes is not None
    assert second.codes.dtype == torch.int64 and second.codes.shape == (counting.num_codebooks, first.codes.shape[1])
    assert first.codes.shape[1] == pytest.approx(len(first.audio) / 1920, abs=1)
    assert torch.equal(first.codes, second.codes)
    assert second.transcript is not None and second.transcript.startswith("Good evening")


def test_editing_the_audio_invalidates(data_dir: Path, counting: CountingEngine) -> None:
    profile = _profile("guest", data_dir / "guest_16k.wav", data_dir / "guest.txt")
    settings, cache = ReferenceSettings(), ReferenceCache()
    first = load_voice(profile, counting, settings, cache)
    assert load_voice(profile, counting, settings, cache).cache_hit
    assert counting.encode_calls == 1

    path = get_paths().clone_dir / "guest_16k.wav"
    audio, sr = sf.read(str(path), dtype="float32")
    sf.write(str(path), audio[: len(audio) // 2], sr)  # the user re-exports a shorter take
    edited = load_voice(profile, counting, settings, cache)
    assert not edited.cache_hit and counting.encode_calls == 2
    assert edited.codes is not None and first.codes is not None
    assert edited.codes.shape[1] < 0.6 * first.codes.shape[1]
    assert load_voice(profile, counting, settings, cache).cache_hit  # and the new codes are cached
    assert counting.encode_calls == 2


def test_settings_model_and_codec_are_part_of_the_key_but_not_the_transcript(
    data_dir: Path, counting: CountingEngine
) -> None:
    profile = _profile("guest", data_dir / "guest_22k.wav", data_dir / "guest.txt")
    cache = ReferenceCache()
    load_voice(profile, counting, ReferenceSettings(), cache)
    other_text = profile.model_copy(update={"transcript": "Something else entirely."})
    assert load_voice(other_text, counting, ReferenceSettings(), cache).cache_hit
    assert not load_voice(profile, counting, ReferenceSettings(target_lufs=-18.0), cache).cache_hit
    assert not load_voice(profile, counting, ReferenceSettings(max_pause_seconds=0.3), cache).cache_hit
    key = counting.model_key
    try:
        counting.model_key = key + "-other-revision"
        assert not load_voice(profile, counting, ReferenceSettings(), cache).cache_hit
    finally:
        counting.model_key = key
    # Codes encoded by the codec in another precision, on another device or with other weights are not reused.
    codec = counting.codec_key
    assert codec.startswith("mimi float32 cpu ")
    try:
        counting.codec_key = "mimi bfloat16 cuda"
        assert not load_voice(profile, counting, ReferenceSettings(), cache).cache_hit
    finally:
        counting.codec_key = codec
    assert load_voice(profile, counting, ReferenceSettings(), cache).cache_hit
    assert counting.encode_calls == 5
    assert len(list(cache.directory.glob("*.safetensors"))) == 5


def test_cache_files_are_safetensors_and_written_atomically(data_dir: Path, counting: CountingEngine) -> None:
    profile = _profile("guest", data_dir / "guest_16k.wav", data_dir / "guest.txt")
    cache = ReferenceCache()
    voice = load_voice(profile, counting, ReferenceSettings(), cache)
    files = list(cache.directory.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary files left behind
    assert files[0].parent == get_paths().reference_cache_dir
    assert voice.codes is not None and torch.equal(load_file(str(files[0]))["codes"], voice.codes)


def test_a_damaged_cache_file_is_recomputed(data_dir: Path, counting: CountingEngine) -> None:
    profile = _profile("guest", data_dir / "guest_16k.wav", data_dir / "guest.txt")
    cache = ReferenceCache()
    first = load_voice(profile, counting, ReferenceSettings(), cache)
    (cached,) = cache.directory.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:50])
    again = load_voice(profile, counting, ReferenceSettings(), cache)
    assert not again.cache_hit and counting.encode_calls == 2
    assert first.codes is not None and again.codes is not None and torch.equal(first.codes, again.codes)


def test_a_profile_without_audio_has_no_codes(counting: CountingEngine) -> None:
    profile = VoiceProfile(name="fresh", speaker=1, generation={"temperature": 0.7, "seed": 3})
    voice = load_voice(profile, counting, ReferenceSettings(), ReferenceCache())
    assert (voice.codes, voice.audio, voice.transcript, voice.speaker) == (None, None, None, 1)
    assert voice.generation == {"temperature": 0.7, "seed": 3}
    assert counting.encode_calls == 0
