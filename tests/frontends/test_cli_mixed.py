"""`signround quantize --target-bits`: the dry run prints and writes the plan; the plan file goes back
in through --layer-config; an unreachable budget is one line naming the minimum."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from signround.cli import app
from tiny_models import save_tiny_text_model

runner = CliRunner()
RECIPE = ["--group-size", "32", "--iters", "2", "--nsamples", "4", "--seqlen", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-llama"))


def test_dry_run_prints_and_writes_the_plan(model_dir, tmp_path):
    plan = tmp_path / "plan.json"
    res = runner.invoke(app, ["quantize", str(model_dir), "--dry-run", *RECIPE, "--target-bits", "3.5",
                              "--candidates", "W2G32,W4G32,W8G32", "--plan-out", str(plan)])
    assert res.exit_code == 0, res.output
    assert "self_attn.qkv_proj" in res.output and "average:" in res.output
    layers = json.loads(plan.read_text())
    assert len(layers) == 14 and {v["bits"] for v in layers.values()} <= {2, 4, 8}
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), *RECIPE, "--layer-config", str(plan)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    info = json.loads(res.stdout)
    assert {n: v["bits"] for n, v in info["layers"].items()} == {n: v["bits"] for n, v in layers.items()}
    assert info["average_bits"] <= 3.5


@pytest.mark.parametrize(("args", "message"), [
    (["--target-bits", "1.5", "--candidates", "W2G32,W4G32"], "minimum achievable is 2.5625 bits per weight"),
    (["--candidates", "W2G32"], "--target-bits"),
    (["--target-bits", "3", "--no-fuse-groups", "--target", "vllm"], "vLLM cannot load"),
])
def test_bad_requests_are_one_line(model_dir, args, message):
    res = runner.invoke(app, ["quantize", str(model_dir), "--dry-run", *RECIPE, *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
