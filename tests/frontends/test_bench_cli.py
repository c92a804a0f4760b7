"""`signround bench` end to end on a CPU at tiny size: it tunes, scores and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from signround.cli import app


def test_bench_runs_tiny_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                                   "--kv-heads", "2", "--iters", "3", "--nsamples", "8", "--seqlen", "32",
                                   "--batch-size", "4", "--device", "cpu", "--no-reference", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and "auto_round" not in result
    ours = result["signround"]
    assert len(ours["seconds_per_block"]) == 2 and len(ours["block_loss"]) == 2
    assert all(loss >= 0 for loss in ours["block_loss"])
    assert "signround" in res.output
