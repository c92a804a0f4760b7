"""Layer sensitivity scores (adapters/engine/scheme.py) on a tiny model built from a config."""

from __future__ import annotations

import pytest
import torch
from scheme_helpers import score_by_hand
from tiny_models import random_batches, tiny_text_model

from signround.adapters.engine.scheme import score_layers
from signround.rounding import QuantSpec

W2, W4, W8 = QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(8, 32)


def _direct(model, batches, name, spec):
    return score_by_hand(model, batches, name, spec)


def test_scores_are_the_fisher_weighted_rtn_output_error() -> None:
    model = tiny_text_model("llama")
    batches = random_batches(2, 2, 12)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_layers(model, batches, {n: (W2, W4, W8) for n in names})
    assert scores.tokens == 2 * 2 * 11
    for n in names:
        w2, w4, w8 = scores.loss[n]
        assert w2 > w4 > w8 > 0  # fewer bits, larger error
        for spec, got in zip((W2, W4, W8), scores.loss[n]):
            assert got == pytest.approx(_direct(model, batches, n, spec), rel=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # left as they were


def test_masked_positions_do_not_count() -> None:
    model = tiny_text_model("qwen2")
    ids = random_batches(1, 2, 10)[0]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    name = "model.layers.1.self_attn.o_proj"
    full = score_layers(model, [{"input_ids": ids, "attention_mask": mask}], {name: (W2,)})
    assert full.tokens == 9 + 5


def test_refuses_what_it_cannot_score() -> None:
    model = tiny_text_model("llama")
    with pytest.raises(ValueError, match="not an nn.Linear"):
        score_layers(model, random_batches(1, 1, 8), {"model.layers.0.mlp": (W4,)})
    ids = torch.full((1, 1), 5)
    with pytest.raises(ValueError, match="no token"):
        score_layers(model, [ids], {"model.layers.0.mlp.up_proj": (W4,)})
