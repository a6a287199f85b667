"""The decoder stack (companion/engine/stack.py) on the tiny checkpoint: the three ways it steps one
position (``forward`` one stream at a time, ``step`` for several streams, ``forward_at`` for a graph)
leave the same hidden states and the same keys and values in the cache; its norm is the model's own,
bit for bit, in bf16 too.

The caches are compared as well as the outputs: the tiny random model's hidden states depend little on
what attention reads, so a key written with the wrong rotation or at the wrong place shows in the cache
first."""

from __future__ import annotations

import copy

import pytest
import torch

from companion.engine import Engine
from companion.engine.frames import FrameLoop
from companion.engine.self_check import TOLERANCE
from companion.engine.stack import DecoderStack, rms_norm

LINES = [(0, "One two."), (1, "A longer line of text, said slowly."), (0, "Three words here.")]


def loop_with_prompts(engine: Engine, model: torch.nn.Module | None = None) -> FrameLoop:
    """Three slots, each holding a prompt of its own length."""
    loop = FrameLoop(model or engine.model, 64, slots=len(LINES))
    for slot, (speaker, text) in enumerate(LINES):
        loop.prefill(engine.prompt.prompt_rows([], speaker, text), slot=slot)
    assert len(set(loop.lengths)) == len(LINES)
    return loop


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding (products over several rows may round unlike those over one): float32's
    last bits, or bf16's tolerance (relative, over the whole tensor)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.float32:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    a, b = a.float(), b.float()
    return bool(torch.linalg.vector_norm(a - b) <= TOLERANCE[torch.bfloat16].relative * torch.linalg.vector_norm(b))


def same_cache(a: DecoderStack, b: DecoderStack, rows: list[int]) -> bool:
    return all(close(ka[rows], kb[rows]) and close(va[rows], vb[rows])
               for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values, strict=True))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_position_stepped_three_ways_leaves_the_same_state_and_cache(tiny_engine: Engine, dtype: torch.dtype) -> None:
    model = tiny_engine.model if dtype == torch.float32 else copy.deepcopy(tiny_engine.model).to(dtype)
    ways = [loop_with_prompts(tiny_engine, model) for _ in range(3)]
    starts = list(ways[0].lengths)
    x = torch.randn(len(LINES), 1, ways[0].audio_embed.shape[1], generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        one_by_one = torch.cat([ways[0].backbone.forward(x[b : b + 1], p, row=b) for b, p in enumerate(starts)])
        together = ways[1].backbone.step(x, starts)
        graphed = ways[2].backbone.forward_at(x, torch.tensor(starts))
    assert close(together, one_by_one) and close(graphed, one_by_one)
    rows = list(range(len(LINES)))
    assert same_cache(ways[1].backbone, ways[0].backbone, rows)
    assert same_cache(ways[2].backbone, ways[0].backbone, rows)


def test_a_padding_row_writes_nothing_and_leaves_the_others_alone(tiny_engine: Engine) -> None:
    stepped, alone, untouched = (loop_with_prompts(tiny_engine) for _ in range(3))
    starts = list(stepped.lengths)
    x = torch.randn(len(LINES), 1, stepped.audio_embed.shape[1], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = stepped.backbone.step(x, [starts[0], None, starts[2]])
        for b in (0, 2):
            assert close(out[b : b + 1], alone.backbone.forward(x[b : b + 1], starts[b], row=b))
    assert same_cache(stepped.backbone, untouched.backbone, [1])  # the padding row's cache as it was
    assert same_cache(stepped.backbone, alone.backbone, [0, 1, 2])


def test_a_step_at_the_last_position_of_the_cache(tiny_engine: Engine) -> None:
    """Each row writes exactly its one position: at the cache's end there is no room for more."""
    loop = FrameLoop(tiny_engine.model, 48, slots=2)
    last = loop.scratch  # the backbone cache's last position (max_seq_len; the graphs' warm-up place)
    x = torch.randn(2, 1, loop.audio_embed.shape[1], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = loop.backbone.step(x, [last, last - 1])
    assert out.shape == x.shape and torch.isfinite(out).all()
    for keys in loop.backbone.keys:
        assert keys[0, :, last].abs().sum() > 0 and keys[1, :, last - 1].abs().sum() > 0
        assert keys[1, :, last].abs().sum() == 0  # row 1 wrote its own position only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_is_the_models_own_bit_for_bit(tiny_engine: Engine, dtype: torch.dtype) -> None:
    norm = copy.deepcopy(tiny_engine.model.backbone_model.norm).to(dtype)
    x = (torch.randn(3, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(8)) * 3).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    assert torch.equal(rms_norm(x, norm.weight.detach(), norm.variance_epsilon), expected)


def test_engines_on_one_model_share_its_fused_weights_and_the_model_reads_them(tiny_engine: Engine) -> None:
    model = copy.deepcopy(tiny_engine.model)
    first, second = FrameLoop(model, 32, slots=1), FrameLoop(model, 32, slots=2)
    for layer, a, b in zip(model.backbone_model.layers, first.backbone.layers, second.backbone.layers, strict=True):
        assert a.w_qkv.data_ptr() == b.w_qkv.data_ptr() and a.w_gate_up.data_ptr() == b.w_gate_up.data_ptr()
        attn, mlp = layer.self_attn, layer.mlp
        blocks = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        assert [w.data_ptr() for w in blocks] == [a.w_qkv[r].data_ptr() for r in (0, len(blocks[0]), len(blocks[0]) + len(blocks[1]))]
        assert mlp.up_proj.weight.data_ptr() == a.w_gate_up[len(mlp.gate_proj.weight)].data_ptr()


def test_a_model_changed_after_fusing_is_fused_again(tiny_engine: Engine) -> None:
    model = copy.deepcopy(tiny_engine.model)
    before = FrameLoop(model, 32, slots=1).backbone.layers[0].w_qkv
    model.to(torch.bfloat16)  # new tensors: the module weights are no longer views of the fused matrix
    after = FrameLoop(model, 32, slots=1).backbone.layers[0].w_qkv
    attn = model.backbone_model.layers[0].self_attn
    assert after.dtype == torch.bfloat16 and after.data_ptr() != before.data_ptr()
    assert torch.equal(after, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert attn.q_proj.weight.data_ptr() == after.data_ptr()


@pytest.mark.parametrize("linear", ["q_proj", "gate_proj"])
def test_a_layer_with_a_bias_is_refused(tiny_engine: Engine, linear: str) -> None:
    model = copy.deepcopy(tiny_engine.model)
    layer = model.backbone_model.layers[1]
    module = getattr(layer.self_attn if linear == "q_proj" else layer.mlp, linear)
    module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0]))
    with pytest.raises(ValueError, match=r"^CSM layers with biases are not supported \(csm-1b has none\)$"):
        FrameLoop(model, 32, slots=1)


def test_weights_pointed_elsewhere_are_fused_again(tiny_engine: Engine) -> None:
    """A model whose q weight was replaced (here by the whole fused matrix: k and v no longer follow it)."""
    model = copy.deepcopy(tiny_engine.model)
    fused = FrameLoop(model, 32, slots=1).backbone.layers[0].w_qkv
    attn = model.backbone_model.layers[0].self_attn
    attn.q_proj.weight.data = fused
    again = FrameLoop(model, 32, slots=1).backbone.layers[0].w_qkv
    assert again.data_ptr() != fused.data_ptr() and len(again) == len(fused) + len(attn.k_proj.weight) * 2
