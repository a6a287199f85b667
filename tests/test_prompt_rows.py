"""The prompt's rows, position by position, with the tiny checkpoint's own tokenizer; and how far two
prompts share a prefix (what the engine's prefix cache reuses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from companion.engine.prompt import NO_TOKEN, PromptBuilder, common_prefix
from companion.engine.types import Segment

K = 32  # the tiny checkpoint's codebooks


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # noqa: ANN201
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir)).tokenizer


def codes(frames: int, start: int = 1) -> torch.Tensor:
    return (torch.arange(K * frames).view(K, frames) + start) % 2048


def test_text_is_bos_speaker_text_eos_with_the_checkpoints_tokens(tokenizer) -> None:  # noqa: ANN001
    builder = PromptBuilder(tokenizer, K)
    body = tokenizer.encode("[3]Hello there.", add_special_tokens=False)
    assert tokenizer.encode("[3]Hello there.") == [tokenizer.bos_token_id, *body]  # as csm-1b's adds <bos>
    assert len(body) > 2 and tokenizer.bos_token_id != tokenizer.eos_token_id
    assert builder.text_ids(3, "Hello there.") == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert builder.text_positions(3, "Hello there.") == len(body) + 2
    assert builder.text_ids(0, "Hello there.") != builder.text_ids(3, "Hello there.")  # the speaker is in it


def test_a_text_segment_is_one_row_per_token_with_no_codes(tokenizer) -> None:  # noqa: ANN001
    builder = PromptBuilder(tokenizer, K)
    rows = builder.segment_rows(Segment(1, "Only words.", None))
    ids = builder.text_ids(1, "Only words.")
    assert rows.shape == (len(ids), K + 1) and rows.dtype == torch.long
    assert rows[:, 0].tolist() == ids and (rows[:, 1:] == NO_TOKEN).all()
    assert builder.segment_positions(Segment(1, "Only words.", None)) == len(ids)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_an_audio_segment_is_its_text_then_its_frames_then_one_all_zero_end_frame(tokenizer, dtype) -> None:  # noqa: ANN001
    builder = PromptBuilder(tokenizer, K)
    seg = Segment(2, "Said aloud.", codes(5).to(dtype))
    rows = builder.segment_rows(seg)
    n = builder.text_positions(2, "Said aloud.")
    assert rows.shape == (n + 5 + 1, K + 1) and rows.dtype == torch.long
    assert rows[:n, 0].tolist() == builder.text_ids(2, "Said aloud.") and (rows[:n, 1:] == NO_TOKEN).all()
    assert (rows[n:, 0] == NO_TOKEN).all()
    assert torch.equal(rows[n : n + 5, 1:], codes(5).T)  # frame t is row n + t, codebook k column k + 1
    assert (rows[-1, 1:] == 0).all()
    assert builder.segment_positions(seg) == len(rows)


@pytest.mark.parametrize("shape", [(K - 1, 4), (K + 1, 4), (K,), (1, K, 4)])
def test_codes_of_the_wrong_shape_are_refused_naming_both_shapes(tokenizer, shape) -> None:  # noqa: ANN001
    builder = PromptBuilder(tokenizer, K)
    with pytest.raises(ValueError) as err:
        builder.segment_rows(Segment(0, "x", torch.zeros(shape, dtype=torch.long)))
    assert str(err.value) == f"segment codes must be (K={K}, T), got {shape}"


def test_a_prompt_is_its_context_segments_then_the_text_to_speak(tokenizer) -> None:  # noqa: ANN001
    builder = PromptBuilder(tokenizer, K)
    context = [Segment(0, "First.", codes(3)), Segment(1, "Second.", None), Segment(0, "Third.", codes(2, 7))]
    rows = builder.prompt_rows(context, 1, "Now this.")
    parts = [builder.segment_rows(s) for s in context] + [builder.segment_rows(Segment(1, "Now this.", None))]
    assert torch.equal(rows, torch.cat(parts))
    assert len(rows) == sum(builder.segment_positions(s) for s in context) + builder.text_positions(1, "Now this.")
    assert torch.equal(builder.prompt_rows([], 1, "Now this."), parts[-1])


def test_common_prefix_counts_the_leading_rows_that_agree() -> None:
    a = torch.arange(5 * 3).view(5, 3)
    assert common_prefix(a, a.clone()) == 5
    assert common_prefix(a, a[:3]) == 3 and common_prefix(a[:3], a) == 3
    assert common_prefix(a[:0], a) == 0 and common_prefix(a, a[:0]) == 0
    assert common_prefix(a[:1], a) == 1 and common_prefix(a[:1], a[1:2]) == 0  # one row each: equal or not
    for row in range(5):
        for col in range(3):  # one value anywhere in a row ends the shared prefix there
            b = a.clone()
            b[row, col] = -7
            assert common_prefix(a, b) == row, (row, col)
    c = a.clone()
    c[1, 2], c[3, 0] = 99, 99
    assert common_prefix(a, c) == 1  # the first difference, not the last
