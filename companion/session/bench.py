"""``companion bench --conversation N``: a scripted conversation through the real ``Session``.

A voice with a 2-minute reference (random Mimi codes and a made-up transcript of matching length, as
in ``companion.engine.bench``) speaks N short lines in a row, each generating up to ``turn_seconds`` of
audio, until the conversation overflows the context and the session prunes it. The session prunes
(``context.prune_to``) and the engine's prefix cache decides what is prefilled: this module only counts.

It runs twice on the same engine: with ``prune_to`` 1.0 (drop just enough turns: a full re-prefill of
the turns before every reply once the context is full, the old behaviour) as the baseline, then with the
configured ``prune_to``. Before each run another voice occupies the engine's cache, so both start cold.

This lives beside the session (not in ``companion.engine``) because it drives a session: the engine
room knows nothing above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.config import Settings
from companion.engine import Engine, Segment
from companion.engine.bench import BenchOptions, engine_run, reference
from companion.engine.prompt import common_prefix
from companion.errors import CompanionError
from companion.session.context import Voice
from companion.session.session import Session

REFERENCE_FRAMES = 1500  # 2 minutes at 12.5 frames/s
TURN_SECONDS = 8.0  # audio generated per line at most (random weights always reach it)
PREFILL_GOAL = 0.25  # mean prefill positions per turn, as a share of max_seq_len
LINES = [  # each one segment (under 3 s estimated), spoken as up to ``turn_seconds`` of audio
    "Good morning, how did you sleep?",
    "I bought fresh bread at the market.",
    "The train was late again today.",
    "Do you remember that song?",
    "It rained as we reached the bridge.",
    "Tell me about your garden.",
    "Shall we cook dinner on Friday?",
    "The museum opens at nine.",
]


@dataclass
class ConversationOptions:
    turns: int = 40
    reference_frames: int = REFERENCE_FRAMES
    turn_seconds: float = TURN_SECONDS
    seed: int = 0


def run_conversations(
    engine: Engine, settings: Settings, opts: ConversationOptions, log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``conversation`` section of the bench: the configured pruning, with the old behaviour
    (``prune_to`` 1.0) under ``baseline``. Raises CompanionError when a prompt lacked the reference."""
    log(f"conversation: {opts.turns} turns, pruning one turn at a time (baseline)")
    baseline = run_conversation(engine, settings, opts, prune_to=1.0)
    log(f"conversation: {opts.turns} turns, pruning to {settings.context.prune_to:g}")
    result = run_conversation(engine, settings, opts, prune_to=settings.context.prune_to)
    for run in (baseline, result):
        if not run["reference_in_every_prompt"]:
            raise CompanionError("the voice's reference was missing from a prompt: this is a bug, please report it")
    result["baseline"] = baseline
    result["prefill_mean_over_baseline"] = result["prefill_positions_mean"] / max(baseline["prefill_positions_mean"], 1e-9)
    return result


def run_conversation(engine: Engine, settings: Settings, opts: ConversationOptions, prune_to: float) -> dict[str, Any]:
    """One scripted conversation; per-turn counts from the session's stats and the engine's cache."""
    # Step 1: the session's settings: short turns, this pruning, fixed seed, no watermark.
    s = settings.model_copy(deep=True)
    s.generation.max_segment_seconds = opts.turn_seconds
    s.generation.seed = opts.seed
    s.context.prune_to = prune_to
    s.watermark.enabled = False
    session = Session(engine, s)
    # Step 2: the pinned 2-minute reference (shorter when the context cannot hold it beside the turns).
    frames = min(opts.reference_frames, int(0.4 * engine.max_seq_len))
    ref = reference(engine, frames, speaker=0, seed=opts.seed)
    assert ref.codes is not None
    session.add_voice(Voice("narrator", 0, ref.text, ref.codes))
    ref_rows = engine.prompt.segment_rows(ref)
    # Step 3: another voice occupies the engine's cache, so the first turn starts cold.
    engine_run(engine, [Segment(1, "Another voice.", ref.codes[:, :8])], "Hello.", 2, BenchOptions())
    # Step 4: the conversation.
    prefill, prompt, first_ms, dropped = [], [], [], []
    with_reference = 0
    for i in range(opts.turns):
        session.stats.clear()
        for _ in session.speak(LINES[i % len(LINES)]):
            pass
        for stats in session.stats:  # one per segment (a line is one segment here)
            prefill.append(stats.prefill_positions)
            prompt.append(stats.prompt_positions)
            first_ms.append(stats.first_audio_ms or 0.0)
            dropped.append(stats.dropped_turns)
        # The engine's cache now holds this turn's prompt: it must begin with the whole reference.
        cached = engine.loop.rows.cpu()
        with_reference += int(common_prefix(cached, ref_rows) == len(ref_rows))
    session.close()
    n = len(prefill)
    return {
        "turns": n,
        "max_seq_len": engine.max_seq_len,
        "prune_to": prune_to,
        "reference_seconds": frames / engine.frame_rate,
        "reference_positions": session.context.reference_positions(),
        "turn_seconds": opts.turn_seconds,
        "prunes": sum(1 for d in dropped if d),
        "turns_dropped": sum(dropped),
        "prefill_positions_mean": float(np.mean(prefill)) if n else 0.0,
        "prefill_positions_max": max(prefill, default=0),
        "prefill_mean_over_max_seq_len": float(np.mean(prefill)) / engine.max_seq_len if n else 0.0,
        "prompt_positions_max": max(prompt, default=0),
        "first_audio_ms_p50": float(np.percentile(first_ms, 50)) if n else None,
        "first_audio_ms_p95": float(np.percentile(first_ms, 95)) if n else None,
        "reference_in_every_prompt": with_reference == opts.turns,
        "prefill_positions": prefill,
        "dropped_turns": dropped,
    }


def goal_met(conversation: dict[str, Any]) -> bool:
    """The conversation goal: it pruned, and a turn prefilled at most 25 % of max_seq_len on average."""
    return conversation["prunes"] > 0 and conversation["prefill_mean_over_max_seq_len"] <= PREFILL_GOAL
