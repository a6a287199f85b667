"""`companion bench` on the tiny checkpoint: the JSON keys and sane values (no timing thresholds)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from companion.cli import main
from companion.engine.floor import measure_bandwidth, weight_bytes_per_frame

REQUIRED = {
    "baseline": ["ms_per_frame"],
    "engine": [
        "ms_per_frame", "rtf", "first_audio_ms_cold", "first_audio_ms_cached", "prefill_ms_ref10s",
        "prefill_ms_ref120s", "mimi_decode_ms_per_frame", "peak_rss_mb", "cuda_max_allocated_mb",
    ],
    "floor": ["weight_bytes_per_frame", "bandwidth_gbps", "ms_per_frame"],
}  # fmt: skip
THREADS_BEFORE = torch.get_num_threads()


@pytest.fixture(scope="module")
def bench_json(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--frames", "3", "--repeats", "3", "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_bench_writes_every_key(bench_json: dict, tiny_model_dir: Path) -> None:
    for section, keys in REQUIRED.items():
        missing = [k for k in keys if k not in bench_json[section]]
        assert not missing, f"{section} lacks {missing}"
    assert bench_json["device"] == "cpu"
    assert bench_json["dtype"] == "float32"
    assert bench_json["model"].startswith(f"{tiny_model_dir.resolve()}@")  # the engine's model key


def test_bench_values_are_sane(bench_json: dict) -> None:
    e, b, f = bench_json["engine"], bench_json["baseline"], bench_json["floor"]
    for value in (b["ms_per_frame"], e["ms_per_frame"], e["first_audio_ms_cold"], e["first_audio_ms_cached"],
                  e["prefill_ms_ref10s"], e["prefill_ms_ref120s"], e["mimi_decode_ms_per_frame"], f["ms_per_frame"], e["peak_rss_mb"]):
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert e["cuda_max_allocated_mb"] is None  # CPU
    assert e["frames"] == 3
    # RTF is (generation + decode) per frame over 80 ms of audio.
    assert e["rtf"] == pytest.approx((e["ms_per_frame"] + e["mimi_decode_ms_per_frame"]) / 80.0)
    # Prefix reuse: after a cached reference only the turn is prefilled, whatever the reference length.
    assert 0 < e["prefill_positions_ref10s"] < 40
    assert e["prefill_positions_ref120s"] == e["prefill_positions_ref10s"]
    # The floor is bytes / bandwidth, and the ratios follow from the numbers.
    assert f["ms_per_frame"] == pytest.approx(f["weight_bytes_per_frame"] / (f["bandwidth_gbps"] * 1e6))
    assert len(f["bandwidth_gbps_samples"]) == 3 and f["bandwidth_gbps"] == max(f["bandwidth_gbps_samples"])
    pairs = bench_json["ratios"]["engine_over_baseline_pairs"]
    runs = zip(e["ms_per_frame_runs"], b["ms_per_frame_runs"], strict=True)
    assert pairs == pytest.approx([a / b for a, b in runs])  # pair by pair, in the order they ran
    assert bench_json["ratios"]["engine_over_baseline"] == statistics.median(pairs)
    assert bench_json["ratios"]["engine_over_floor"] == pytest.approx(e["ms_per_frame"] / f["ms_per_frame"])


def test_weight_bytes_counts_each_part(tiny_engine) -> None:
    """Counted from the config by hand: backbone once, depth decoder K-1 times, heads once."""
    cfg = tiny_engine.model.config
    d = cfg.depth_decoder_config
    k, size = cfg.num_codebooks, tiny_engine.model.lm_head.weight.element_size()

    def layers(c, n_layers: int) -> int:
        head_dim = c.hidden_size // c.num_attention_heads
        attn = 2 * c.hidden_size * c.num_attention_heads * head_dim + 2 * c.hidden_size * c.num_key_value_heads * head_dim
        mlp = 3 * c.hidden_size * c.intermediate_size
        return n_layers * (attn + mlp + 2 * c.hidden_size) + c.hidden_size  # + 2 norms per layer, final norm

    backbone = layers(cfg, cfg.num_hidden_layers)
    depth = layers(d, d.num_hidden_layers) + d.backbone_hidden_size * d.hidden_size  # + input projection
    expected = backbone + cfg.vocab_size * cfg.hidden_size + (k - 1) * depth + (k - 1) * d.hidden_size * d.vocab_size
    parts = weight_bytes_per_frame(tiny_engine.model)
    assert parts["total"] == expected * size
    assert parts["depth_decoder"] == (k - 1) * depth * size


def test_bandwidth_probe_gives_a_rate() -> None:
    rate = measure_bandwidth(torch.device("cpu"), torch.float32, total_bytes=64 << 20, repeats=1)
    assert math.isfinite(rate) and rate > 0.01


def test_bench_leaves_torch_threads_as_they_were(bench_json: dict) -> None:
    assert bench_json["machine"]["torch_threads"] == 1  # --threads 1 applied during the run
    assert torch.get_num_threads() == THREADS_BEFORE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "x", "--random-weights", "tiny"], "exclude each other"),
        (["--random-weights", "tiny", "--frames", "1"], "--frames must be at least 2"),
        (["--random-weights", "tiny", "--threads", "0"], "--threads 0: must be greater than or equal to 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_engine_and_the_baseline_are_measured_in_interleaved_pairs(tiny_engine) -> None:
    """Each pair is an engine run and the baseline run right after it; the headline is their median."""
    from companion.engine import bench

    order: list[str] = []
    real_engine_run, real_baseline = bench.engine_run, bench.baseline_ms_per_frame

    def engine_run(*args, **kwargs):
        order.append("engine")
        return real_engine_run(*args, **kwargs)

    def baseline(*args, **kwargs):
        order.append("baseline")
        return real_baseline(*args, **kwargs)

    opts = bench.BenchOptions(frames=3, repeats=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "engine_run", engine_run)
        patch.setattr(bench, "baseline_ms_per_frame", baseline)
        eng, base, pairs, _ = bench.speed_pairs(tiny_engine, bench.reference(tiny_engine, 20), opts, lambda t: None)
    assert order == ["engine", "engine", "baseline"] + ["engine", "baseline"] * 3  # the warm-ups, then three pairs
    runs = zip(eng["ms_per_frame_runs"], base["ms_per_frame_runs"], strict=True)
    assert pairs == [a / b for a, b in runs]


def test_streams_are_measured_in_rounds_and_each_count_against_one_of_its_round(tiny_model_dir) -> None:
    """--streams: every count once per round (1, 2, 4, 1, 2, 4, ...), each in an engine of its size (one:
    the one-stream engine); each count's speed-up over one stream is the median of its rounds' ratios;
    every stream makes all its frames."""
    from companion.engine import Engine, bench, bench_streams

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", max_seq_len=512, max_batch=4)
    calls: list[tuple[int, int]] = []  # (streams, the max_batch of the engine they ran on)
    given: list[bool] = []
    real = bench_streams.run_streams

    def run_streams(run_on, n, *args, **kwargs):
        calls.append((n, run_on.max_batch))
        given.append(run_on is engine)
        assert run_on.model is engine.model  # the same weights
        return real(run_on, n, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_streams, "run_streams", run_streams)
        out = bench_streams.streams_section(engine, [1, 2, 4], bench.BenchOptions(frames=3, repeats=2), lambda t: None)
    # Each count on an engine of its own size (four: the one given): two warm-ups each (the second after
    # any compiling the first started), then two rounds.
    warm_ups = [(1, 1), (1, 1), (2, 2), (2, 2), (4, 4), (4, 4)]
    assert calls == warm_ups + [(1, 1), (2, 2), (4, 4)] * 2
    assert given == [False, False, False, False, True, True] + [False, False, True] * 2
    rows = {row["streams"]: row for row in out["streams"]}
    assert sorted(rows) == [1, 2, 4] and out["frames"] == 3
    for n, row in rows.items():
        one = rows[1]["seconds_runs"]
        pairs = [n * a / b for a, b in zip(one, row["seconds_runs"], strict=True)]
        assert row["aggregate_over_one_pairs"] == pairs
        assert row["aggregate_over_one"] == statistics.median(pairs)
        assert row["aggregate_frames_per_s"] == n * 3 / min(row["seconds_runs"])
        assert row["rtf_per_stream"] == min(row["seconds_runs"]) * 1000 / 3 / 80.0
    assert engine.active_streams == 0


@pytest.mark.parametrize("value", ["1,x", "0,2", ",", "-1"])
def test_bad_stream_counts_are_one_line_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--random-weights", "tiny", "--streams", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--streams" in err and "1,2,4,8" in err
