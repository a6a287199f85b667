"""A long conversation through the real Session and engine: pruning with slack keeps the prefill small.

Counts only (positions prefilled per turn, from the engine's prefix cache; turns dropped, from the
session); no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from companion.config import load_settings
from companion.session.bench import ConversationOptions, goal_met, run_conversation, run_conversations


@pytest.fixture(scope="module")
def conversations(tiny_engine) -> dict:  # noqa: ANN001
    """12 turns of 4 s after a 25 s reference at max_seq_len 1024: the context overflows at turn ~9."""
    settings = load_settings(overrides={"context": {"max_seq_len": 1024, "prune_to": 0.6}})
    opts = ConversationOptions(turns=12, reference_frames=312, turn_seconds=4.0)
    return run_conversations(tiny_engine, settings, opts, log=lambda _: None)


def test_pruning_with_slack_keeps_the_mean_prefill_under_a_quarter_of_the_context(conversations: dict) -> None:
    c = conversations
    assert c["turns"] == 12 and c["max_seq_len"] == 1024
    assert c["reference_in_every_prompt"]
    assert c["prunes"] > 0
    assert c["prefill_positions_mean"] <= 0.25 * c["max_seq_len"]
    assert goal_met(c)
    # After a prune the next turns only prefill their own text and the last reply's end, far less than
    # the turns kept (no full re-prefill on every turn).
    pairs = zip(c["prefill_positions"][1:], c["dropped_turns"][1:], c["dropped_turns"][:-1], strict=True)
    after_prune = [p for p, d, before in pairs if not d and before]
    assert after_prune and max(after_prune) < 0.1 * c["max_seq_len"]


def test_pruning_one_turn_at_a_time_re_prefills_every_turn_once_full(conversations: dict) -> None:
    """The baseline (prune_to 1.0, the old behaviour): once full, every turn drops one turn and
    prefills all the turns again, so its mean is higher than with slack."""
    b = conversations["baseline"]
    assert b["prune_to"] == 1.0 and b["reference_in_every_prompt"]
    first = next(i for i, d in enumerate(b["dropped_turns"]) if d)
    assert b["dropped_turns"][first:] == [1] * (b["turns"] - first)
    turns_room = b["max_seq_len"] - 50 - b["reference_positions"]  # the context minus the reply and reference
    assert min(b["prefill_positions"][first + 1:]) > 0.5 * turns_room
    assert conversations["prefill_positions_mean"] < b["prefill_positions_mean"]
    assert conversations["prefill_mean_over_baseline"] < 1


def test_a_conversation_that_never_fills_the_context_never_prunes(tiny_engine) -> None:  # noqa: ANN001
    settings = load_settings(overrides={"context": {"max_seq_len": 1024}})
    c = run_conversation(tiny_engine, settings, ConversationOptions(turns=2, reference_frames=50, turn_seconds=3.0),
                         prune_to=0.6)
    assert c["prunes"] == 0 and c["turns"] == 2 and c["reference_in_every_prompt"]
    assert c["prefill_positions"][0] > c["reference_positions"]  # it started cold: the reference was prefilled
    assert c["prefill_positions"][1] < c["prefill_positions"][0]  # the reference was cached for turn 2


def test_bench_conversation_from_the_cli_with_threads_from_the_config(tiny_model_dir: Path, tmp_path: Path,
                                                                     companion_home: Path) -> None:
    """The real CLI in a fresh process where torch would pick 2 threads: the config's engine.threads
    (1) is what runs, and the JSON has the conversation section."""
    config = companion_home / "config" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("context:\n  max_seq_len: 2048\nengine:\n  threads: 1\n", encoding="utf-8")
    out = tmp_path / "c.json"
    argv = ["bench", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--conversation", "2",
            "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "companion", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["machine"]["torch_threads"] == 1
    c = result["conversation"]
    for key in ("turns", "max_seq_len", "prunes", "prefill_positions_mean", "prefill_positions_max",
                "first_audio_ms_p50", "first_audio_ms_p95"):
        assert key in c and key in c["baseline"], key
    assert c["turns"] == 2 and c["max_seq_len"] == 2048 and c["reference_in_every_prompt"]
    assert "prefill positions per turn, mean" in proc.stdout and "first audio p95" in proc.stdout
