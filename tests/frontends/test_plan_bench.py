"""The accuracy harness's plan options (tests/bench/accuracy.py, issue 19): `--no-fuse-groups` reaches our
planner, and the plan it records carries per-choice scores that re-solve to the same plan."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tiny_models import random_batches, tiny_text_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import accuracy  # noqa: E402  (a bench script, not a test module)

CANDIDATES = "W2G32,W4G32,W8G32"


def test_no_fuse_groups_flag_parses() -> None:
    base = ["--configs", "", "--target-bits", "3.5", "--device", "cpu"]
    assert accuracy.parse(base).no_fuse_groups is False
    assert accuracy.parse([*base, "--no-fuse-groups"]).no_fuse_groups is True


def test_our_plan_without_fused_groups_scores_every_layer_alone() -> None:
    model = tiny_text_model("llama")
    batches = random_batches(2, 2, 16)
    fused = accuracy.our_plan(model, batches, 3.5, CANDIDATES, "cpu", 0)
    free = accuracy.our_plan(model, batches, 3.5, CANDIDATES, "cpu", 0, fuse_groups=False)
    assert fused.fuse_groups and not free.fuse_groups
    assert any(g.name.endswith("qkv_proj") for g in fused.groups)
    assert all(len(g.layers) == 1 for g in free.groups)
    assert free.average_bits <= 3.5
    # a fused group's score is its members' scores summed: the free plan's scores are the parts
    parts = {g.name: g.scores for g in free.groups}
    for g in fused.groups:
        if len(g.layers) > 1:
            for cand, score in g.scores.items():
                assert score == pytest.approx(sum(parts[n][cand] for n in g.layers), rel=1e-9)
