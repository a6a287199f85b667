"""Streaming Mimi decode equals decoding the whole segment at once (issue 3, acceptance 2)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import MimiConfig, MimiModel
from transformers.models.mimi import modeling_mimi as mm
from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

from companion.engine.mimi_stream import SAMPLES_PER_FRAME, TRANSFORMERS_RANGE, MimiStreamDecoder
from companion.errors import CompanionError

CODEBOOKS = 8
CODEBOOK_SIZE = 64


def tiny_mimi(sliding_window: int = 250, **overrides: object) -> MimiModel:
    """A tiny random Mimi with the real strides (8, 6, 5, 4; 1920 samples per frame) and real window."""
    torch.manual_seed(0)
    cfg = MimiConfig(
        hidden_size=32,
        num_filters=4,
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=16,
        num_quantizers=CODEBOOKS,
        vector_quantization_hidden_dimension=16,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=sliding_window,
        **overrides,
    )
    model = MimiModel(cfg).eval()
    with torch.no_grad():
        # transformers initializes codebooks to zeros (silence in, constant out): make them random.
        for module in model.quantizer.modules():
            if isinstance(module, MimiEuclideanCodebook):
                module.embed_sum.normal_()
                module._embed = None  # transformers caches embed_sum / cluster_usage on first use
        # Layer scales of the initial size (0.01) hide transformer errors; make the transformer matter.
        for layer in model.decoder.decoder_transformer.layers:
            layer.self_attn_layer_scale.scale.fill_(1.0)
            layer.mlp_layer_scale.scale.fill_(1.0)
    return model


def whole(mimi: MimiModel, codes: torch.Tensor) -> np.ndarray:
    """transformers' one-shot decode of `(K, T)` codes -> `(T*1920,)`."""
    with torch.inference_mode():
        return mimi.decode(codes[None]).audio_values[0, 0].numpy()


def streamed(decoder: MimiStreamDecoder, codes: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """Decode `(K, T)` codes in chunks of the given sizes (cycled) and concatenate."""
    decoder.reset()
    out, start, i = [], 0, 0
    while start < codes.shape[1]:
        f = sizes[i % len(sizes)]
        chunk = decoder.decode(codes[:, start : start + f])
        assert chunk.dtype == np.float32
        assert chunk.shape == (min(f, codes.shape[1] - start) * SAMPLES_PER_FRAME,)
        out.append(chunk)
        start, i = start + f, i + 1
    return np.concatenate(out)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait for each
    other make every small op slow (this module: 77 s with 2 threads under load, 7 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mimi() -> MimiModel:
    return tiny_mimi()


@pytest.fixture(scope="module")
def long_codes() -> torch.Tensor:
    """140 frames = 280 transformer steps: past the 250-step sliding window."""
    return torch.randint(0, CODEBOOK_SIZE, (CODEBOOKS, 140), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunk", [1, 2, 5, 20])
def test_streaming_equals_whole_decode(mimi: MimiModel, long_codes: torch.Tensor, chunk: int) -> None:
    ref = whole(mimi, long_codes)
    out = streamed(MimiStreamDecoder(mimi), long_codes, [chunk])
    assert out.shape == ref.shape == (140 * SAMPLES_PER_FRAME,)
    assert rel_error(out, ref) <= 1e-4


def test_naive_chunked_decode_is_wrong(mimi: MimiModel, long_codes: torch.Tensor) -> None:
    """The reason for this module: transformers' decode carries no state between chunks."""
    codes = long_codes[:, :20]
    naive = np.concatenate([whole(mimi, codes[:, i : i + 5]) for i in range(0, 20, 5)])
    assert rel_error(naive, whole(mimi, codes)) > 1e-2


def test_uneven_chunks_and_reset(mimi: MimiModel, long_codes: torch.Tensor) -> None:
    decoder = MimiStreamDecoder(mimi)
    first = long_codes[:, :37]
    second = long_codes[:, 50:90]
    # A first segment, then reset: the second segment must not hear the first.
    assert rel_error(streamed(decoder, first, [3, 1, 7]), whole(mimi, first)) <= 1e-4
    assert rel_error(streamed(decoder, second, [1, 4, 2, 11]), whole(mimi, second)) <= 1e-4


def test_small_sliding_window_trims_the_cache() -> None:
    """With a 6-step window, every chunk after the third frame drops keys; still exact."""
    mimi = tiny_mimi(sliding_window=6)
    codes = torch.randint(0, CODEBOOK_SIZE, (CODEBOOKS, 24), generator=torch.Generator().manual_seed(2))
    for sizes in ([1], [2, 5], [20]):
        assert rel_error(streamed(MimiStreamDecoder(mimi), codes, sizes), whole(mimi, codes)) <= 1e-4


def test_rejects_bad_shapes(mimi: MimiModel) -> None:
    decoder = MimiStreamDecoder(mimi)
    with pytest.raises(ValueError, match=r"\(K, f\)"):
        decoder.decode(torch.zeros(CODEBOOKS, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(K, f\)"):
        decoder.decode(torch.zeros(1, CODEBOOKS, 3, dtype=torch.long))


def test_unsupported_structure_fails_loudly() -> None:
    """A Mimi whose convolutions are not causal cannot stream: one clear error at construction."""
    with pytest.raises(CompanionError, match="streaming Mimi decode does not support"):
        MimiStreamDecoder(tiny_mimi(use_causal_conv=False, trim_right_ratio=1.0))


@pytest.mark.parametrize("part", ["rotary_emb", "apply_rotary_pos_emb"])
def test_a_missing_rotary_embedding_fails_at_construction(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both rotary pieces are checked up front (not a bare AttributeError in the first turn)."""
    mimi = tiny_mimi()
    if part == "rotary_emb":
        del mimi.decoder.decoder_transformer.rotary_emb
    else:
        monkeypatch.delattr(mm, "apply_rotary_pos_emb")
    with pytest.raises(CompanionError, match=part) as err:
        MimiStreamDecoder(mimi)
    assert TRANSFORMERS_RANGE in str(err.value) and "\n" not in str(err.value)


def test_the_accepted_transformers_range_is_the_pinned_one() -> None:
    """The error's advice and pyproject.toml name the same versions, and this one is among them."""
    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    (pin,) = re.findall(r'^\s*"(transformers[^"]*)"', pyproject, flags=re.M)
    assert pin == f"transformers{TRANSFORMERS_RANGE}"
    assert transformers.__version__ in SpecifierSet(TRANSFORMERS_RANGE)
