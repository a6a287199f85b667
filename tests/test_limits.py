"""Limits checked before any model work (context.max_seq_len against the schema and the memory) and
the CPU thread count (one setting, applied once, changed by nothing else)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_doctor import _row

from companion.cli import build_parser, main
from companion.commands.common import torch_threads
from companion.engine import memory

MODEL_COMMANDS = [["chat"], ["say", "hi"], ["batch", "s.txt", "-o", "out"], ["history", "export", "1", "f.wav"],
                  ["voice", "encode", "v"], ["bench"], ["eval", "session", "1"], ["serve"]]


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}, stdin=subprocess.DEVNULL)


def _config(home: Path, text: str) -> Path:
    path = home / "config" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- max_seq_len ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["say", "hello", "-o", "x.wav"], ["chat"]])
def test_an_absurd_max_seq_len_is_one_line_before_any_model_work(command: list[str], companion_home: Path,
                                                                  tmp_path: Path) -> None:
    """The model folder does not exist: an error about it would mean the model was looked at first."""
    _config(companion_home, "context:\n  max_seq_len: 100000000\n")
    proc = _run([*command, "--model", str(tmp_path / "no-such-model")])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "max_seq_len" in lines[0] and "32768" in lines[0] and "config.yaml" in lines[0]
    assert "no-such-model" not in proc.stderr


def test_doctor_flags_an_absurd_max_seq_len(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _config(companion_home, "context:\n  max_seq_len: 100000000\n")
    code = main(["doctor"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAIL" in _row(out, "config") and "max_seq_len" in _row(out, "config")
    assert "not checked" in _row(out, "context")
    assert "config" in err


def test_doctor_shows_the_context_estimate(companion_home: Path, tiny_model_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _config(companion_home, f"model:\n  id: {tiny_model_dir}\n  device: cpu\ncontext:\n  max_seq_len: 4096\n")
    assert main(["doctor"]) in (0, 1)
    row = _row(capsys.readouterr().out, "context")
    assert "ok" in row and "4096 positions" in row and "trained on 2048" in row


def test_the_estimate_counts_the_kv_cache_from_the_checkpoint_config(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_position = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4
    small, large = (memory.estimate(str(tiny_model_dir), None, n, 4) for n in (1024, 2048))
    assert small.source.endswith("config.json") and small.weights == large.weights
    # Doubling the positions adds at least the KV cache of 1024 positions (plus bookkeeping and scores).
    assert large.context - small.context >= 1024 * kv_per_position
    # Weights come from the safetensors headers: the tiny model's parameters at 4 bytes (Mimi included).
    params = memory.safetensors_params(tiny_model_dir)
    assert params is not None and small.weights == params * 4


def test_csm_1b_sizes_are_used_when_the_checkpoint_cannot_be_read() -> None:
    est = memory.estimate("someone/not-downloaded", None, 4096, 2)
    assert est.source == "CSM-1B sizes"
    kv = 16 * 2 * 8 * 64 * 2 * 4096  # layers x 2 x kv_heads x head_dim x bf16 bytes x positions
    scores = 32 * memory.PREFILL_CHUNK * 4096 * 4  # heads x chunk x positions x float32
    assert kv + scores < est.context < 1.1 * (kv + scores)
    assert 3.0e9 < est.weights < 3.5e9  # 1.63 B parameters in bf16, Mimi in float32


def test_a_context_that_does_not_fit_the_memory_names_what_would() -> None:
    est = memory.estimate("someone/not-downloaded", None, 32768, 4)
    available = est.weights + est.context // 2
    assert not memory.fits(est, available) and memory.fits(est, est.total)
    message = memory.too_big_message(est, available, "available memory")
    assert "\n" not in message and "context.max_seq_len 32768 needs about" in message
    suggested = int(message.split("at most about ")[1].split()[0])
    assert 64 <= suggested < 32768
    assert memory.fits(memory.estimate("someone/not-downloaded", None, suggested, 4), available)


def test_several_streams_need_a_context_each_and_the_message_names_max_batch() -> None:
    one = memory.estimate("someone/not-downloaded", None, 4096, 2)
    four = memory.estimate("someone/not-downloaded", None, 4096, 2, streams=4)
    assert four.weights == one.weights and four.context == 4 * one.context
    available = one.total + one.context  # room for two streams' contexts, not four
    assert memory.fits(one, available) and not memory.fits(four, available)
    message = memory.too_big_message(four, available, "available memory")
    assert "\n" not in message and "for 4 streams at once" in message and "engine.max_batch" in message
    suggested = int(message.split("at most about ")[1].split()[0])
    assert memory.fits(memory.estimate("someone/not-downloaded", None, suggested, 2, streams=4), available)
    assert "max_batch" not in memory.too_big_message(one, one.weights, "available memory")


# ---- threads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", MODEL_COMMANDS)
def test_every_command_that_loads_the_model_takes_threads(argv: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--threads", "3"])
    assert args.threads == 3


def test_download_does_not_take_threads() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["download", "--threads", "3"])


def test_torch_threads_applies_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(before + 1) as n:
        assert n == before + 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:  # torch's own choice: untouched
        assert n == before


def test_doctor_shows_the_configured_threads(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _config(companion_home, "engine:\n  threads: 3\n")
    main(["doctor"])
    assert "3 CPU threads (engine.threads" in _row(capsys.readouterr().out, "threads")


def test_preparing_a_reference_leaves_the_thread_count_alone(data_dir: Path) -> None:
    """silero-vad sets torch's threads to 1 when imported; in a fresh process, preparing a reference
    (which imports it) must leave the count the program chose."""
    code = (
        "import torch, sys; torch.set_num_threads(3)\n"
        "from companion.audio.prepare import prepare_reference\n"
        "from companion.config import ReferenceSettings\n"
        f"prepare_reference({str(data_dir / 'guest.mp3')!r}, ReferenceSettings())\n"
        "print(torch.get_num_threads())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "3"


def test_speech_detection_in_process_keeps_the_thread_count() -> None:
    from companion.audio.prepare import detect_speech

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        detect_speech(np.zeros(24000, dtype=np.float32) + 0.01)
        assert torch.get_num_threads() == before + 1
