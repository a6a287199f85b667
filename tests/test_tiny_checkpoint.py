"""The tiny checkpoint kit: hub layout, loadable by the real classes, deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CsmForConditionalGeneration, CsmProcessor

from companion.testing.tiny_checkpoint import write_tiny_checkpoint

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "chat_template.jinja",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_the_hub_layout(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "companion.testing.tiny_checkpoint",
        str(out),
        "--codebooks",
        "8",
        "--seed",
        "3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8 codebooks" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(HUB_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "csm"
    assert config["num_codebooks"] == 8
    assert config["codec_config"]["num_quantizers"] == 8
    assert config["codec_config"]["upsampling_ratios"] == [8, 6, 5, 4]  # the real Mimi strides
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_loads_with_the_real_classes_and_generates(tiny_model_dir: Path) -> None:
    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = CsmProcessor.from_pretrained(tiny_model_dir)
    assert model.config.num_codebooks == 32
    # csm-1b's sampling defaults, the depth decoder's saved with a depth_decoder_ prefix.
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (gen["top_k"], gen["depth_decoder_top_k"], gen["depth_decoder_do_sample"]) == (50, 50, True)
    audio = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    conversation = [
        {
            "role": "0",
            "content": [{"type": "text", "text": "Hello there."}, {"type": "audio", "path": audio}],
        },
        {"role": "1", "content": [{"type": "text", "text": "Good morning."}]},
    ]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    audio_id, audio_eos = tok.convert_tokens_to_ids("<|AUDIO|>"), tok.convert_tokens_to_ids("<|audio_eos|>")
    # Layout: <bos>[0]text<eos> <AUDIO>*13 <audio_eos> <bos>[1]text<eos> (1 s of audio = 13 Mimi frames).
    assert ids[0] == bos and ids.count(bos) == 2 and ids[-1] == eos
    assert ids.count(audio_id) == 13 and ids.count(audio_eos) == 1
    assert ids.index(audio_eos) == ids.index(audio_id) + 13
    assert tok.decode(ids[1 : ids.index(eos)]) == "[0]Hello there."
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=3)
    assert out.shape == (1, 3, 32)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny_checkpoint(tmp_path / "a", codebooks=4, seed=1)
    b = write_tiny_checkpoint(tmp_path / "b", codebooks=4, seed=1)
    c = write_tiny_checkpoint(tmp_path / "c", codebooks=4, seed=2)
    for name in HUB_FILES:
        assert _sha(a / name) == _sha(b / name), name
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")


def test_rejects_fewer_than_two_codebooks(tmp_path: Path) -> None:
    from companion.testing.tiny_checkpoint import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "x"), "--codebooks", "1"])
    assert exc.value.code == 2
