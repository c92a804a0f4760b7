"""`signround bench` end to end on a CPU at tiny size: it tunes, scores and writes its JSON; the
presets, the overrides and the spec/performance.json record."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from signround.adapters.frontends import bench
from signround.cli import app

SUMMARY_KEYS = {"ours_steady_s", "ref_steady_s", "ours_peak_gib", "ref_peak_gib", "loss_ratio", "gpu", "commit"}


def test_bench_runs_tiny_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--dims", "tiny", "--iters", "3", "--device", "cpu", "--no-reference",
                                   "--cache", "device", "--profile", str(tmp_path / "prof"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and "auto_round" not in result and result["cache_device"] == "cpu"
    assert result["config"]["iters"] == 3 and result["config"]["hidden"] == 64  # override on top of the preset
    ours = result["signround"]
    assert len(ours["seconds_per_block"]) == 2 and len(ours["block_loss"]) == 2
    assert all(loss >= 0 for loss in ours["block_loss"])
    assert ours["steady_seconds_per_block"] == ours["seconds_per_block"][1]
    assert ours["first_block_overhead_seconds"] == pytest.approx(ours["seconds_per_block"][0]
                                                                 - ours["seconds_per_block"][1])
    assert ours["peak_memory_bytes"] > 0 and result["model_bytes"] > result["embedding_bytes"] > 0
    assert set(result["summary"]) == SUMMARY_KEYS
    assert result["summary"]["ours_steady_s"] == ours["steady_seconds_per_block"]
    assert result["summary"]["ref_steady_s"] is None and result["summary"]["loss_ratio"] is None
    assert "skipped" in result["profile"] and not (tmp_path / "prof").exists()  # CUDA only
    assert "signround" in res.output


def test_presets_and_overrides() -> None:
    assert set(bench.DIMS) == {"2b", "8b", "70b", "tiny"}
    cfg = bench.BenchConfig.preset("70b", layers=1, iters=None)
    assert (cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads, cfg.vocab) == (8192, 28672, 64, 8, 32000)
    assert cfg.layers == 1 and cfg.iters == 200
    assert bench.BenchConfig.preset("8b").layers == 3
    with pytest.raises(ValueError, match="not a preset"):
        bench.BenchConfig.preset("13b")
    res = CliRunner().invoke(app, ["bench", "--dims", "13b"])
    assert res.exit_code == 2 and "not a preset" in res.output


def test_performance_record_and_merge(tmp_path: Path) -> None:
    result = {"gpu": "NVIDIA H200", "commit": "abc",
              "signround": {"steady_seconds_per_block": 2.0, "peak_memory_bytes": 3 * 2**30, "block_loss": [1.0, 0.5]},
              "auto_round": {"steady_seconds_per_block": 4.0, "peak_memory_bytes": 2**30, "block_loss": [1.0, 1.0]}}
    rec = bench.performance_record(result)
    assert rec == {"ours_steady_s": 2.0, "ref_steady_s": 4.0, "ours_peak_gib": 3.0, "ref_peak_gib": 1.0,
                   "loss_ratio": 0.5, "gpu": "NVIDIA H200", "commit": "abc"}
    path = tmp_path / "performance.json"
    bench.merge_performance(path, {"2b": rec})
    bench.merge_performance(path, {"8b": rec})
    assert set(json.loads(path.read_text())) == {"2b", "8b"}


def test_snapshot_is_trimmed_under_the_limit(tmp_path: Path) -> None:
    events = [{"action": "alloc", "addr": i, "size": 512, "frames": [{"filename": f"{i:0200d}"}]} for i in range(2000)]
    snap = {"segments": [{"blocks": [{"size": 1, "frames": [{"filename": "x"}]}]}], "device_traces": [events]}
    # frames of the oldest events go first; every event stays
    info = bench._write_snapshot(snap, tmp_path / "s.pickle", limit=200_000)
    kept = pickle.loads((tmp_path / "s.pickle").read_bytes())
    assert info["bytes"] <= 200_000 and info["trace_events_kept"] == 2000
    assert 0 < info["trace_events_with_frames"] < 2000 and kept["device_traces"][0][-1]["frames"]
    assert not kept["device_traces"][0][0]["frames"] and snap["device_traces"][0][0]["frames"]  # input untouched
    # then the oldest events
    info = bench._write_snapshot(snap, tmp_path / "s.pickle", limit=20_000)
    kept = pickle.loads((tmp_path / "s.pickle").read_bytes())
    assert info["bytes"] <= 20_000 and 0 < info["trace_events_kept"] < 2000
    assert kept["device_traces"][0][-1]["addr"] == 1999


def test_profile_path_runs_cpu_side(tmp_path: Path) -> None:
    """The profile's own code (table, kernel sums) on the CPU profiler, as CUDA would run it."""
    import torch

    cfg = bench.BenchConfig.preset("tiny", device="cpu", profile_iters=2)
    accel = bench.resolve("cpu")
    info = bench.profile_block(cfg, accel, bench.make_batches(cfg), tmp_path, torch.float32, force=True)
    assert (tmp_path / "ops.txt").read_text().count("Name") >= 2
    assert info["iters"] == 2 and info["kernel_us_total"] == 0 and info["gemm_share"] is None
