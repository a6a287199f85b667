"""The prepared GPU script (benchmarks/gpu_check.py) runs its whole logic on a CPU with ``--dry-run``.

A GPU is lent to few sessions: the script must work the first time one is. The dry run drives every
section on the tiny checkpoint with the eager replay (``Capture``), so the comparisons it reports are
real ones: replayed vs eager codes, eager vs transformers' ``generate``, and teacher-forced logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    code = load_script().main(["--dry-run", "--frames", "8", "--skip-bench", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0
    assert "errors" not in result
    assert result["self_check"]["passed"] and result["graphs_off_reason"] is None
    for part in (result["tiny"], result["float32"], result):
        assert part["exactness"]["equal"] and part["exactness"]["frames"] == 8
        assert part["exactness"]["eager_vs_transformers"]["equal"]
        assert part["sampled"]["equal"] and part["sampled"]["frames"] == 8 and part["sampled"]["graphs_on"]
        assert part["self_check"]["units"] == ["greedy", "sampled"]
    streams = result["streams"]  # several streams at once: exact on the CPU, every count measured
    assert streams["beside_three_vs_alone"]["equal"] and streams["graphs_on"]
    assert [row["streams"] for row in streams["streams"]] == [1, 2, 4, 8]
    for row in streams["streams"]:  # every count made all its frames (the dry run's 4), in every round
        assert row["aggregate_frames_per_s"] == row["streams"] * 4 / min(row["seconds_runs"])
    assert streams["batch_units"] == ["8 greedy", "8 sampled"]  # every frame at the engine's 8 rows
    forced = result["teacher_forced"]
    assert forced["frames"] == 8
    for step in ("eager_step", "graph_step", "graph_step_float32"):
        assert forced[step]["argmax_agrees"] == 1.0
    assert result["graph_speed"]["graphed_frames"] == [4]
    compiled = result["compiled"]  # compiled frames: self-checked, timed beside the others, benched
    assert compiled["fused_on"] and compiled["fused_off_reason"] is None
    assert sorted(compiled["ms_per_frame_rounds"]) == ["eager", "fused", "graphed"]
    assert all(len(v) == 1 for v in compiled["ms_per_frame_rounds"].values())
    assert compiled["transformers_eager_ms_per_frame"] > 0 and compiled["transformers_compiled_ms_per_frame"] > 0
    assert compiled["bench"]["compiled"] == "on" and compiled["bench"]["engine"]["frames"] == 4
    assert result["tiny_fused"]["equal"] and result["tiny_fused"]["frames"] == 8 and result["tiny_fused"]["fused_on"]
