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


def test_span_and_shared_layers_flags_parse() -> None:
    base = ["--configs", "", "--target-bits", "3.5", "--device", "cpu"]
    args = accuracy.parse(base)
    assert args.span is None and args.autoscheme_shared_layers is False
    args = accuracy.parse([*base, "--span", "1", "--autoscheme-shared-layers"])
    assert args.span == 1 and args.autoscheme_shared_layers is True


def test_autoscheme_with_shared_layers_keeps_fused_sets_on_one_scheme(tmp_path) -> None:
    pytest.importorskip("auto_round")
    from _templating_helpers import byte_tokenizer
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer([])
    tiny_text_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # AutoScheme reads blocks from disk
    batches = random_batches(2, 2, 32)
    plan, _ = accuracy.autoscheme_plan(model, tok, batches, 4.5, CANDIDATES, "cpu", tmp_path / "as", shared=True)
    bits = {n: v["bits"] for n, v in plan.items()}
    for block in ("model.layers.0", "model.layers.1"):
        for members in accuracy.FUSED_SETS:
            parent = "self_attn" if members[0] == "q_proj" else "mlp"
            assert len({bits[f"{block}.{parent}.{m}"] for m in members}) == 1, (block, members)
    assert len(set(bits.values())) > 1  # a real mix, not one grid everywhere
