"""The tuning loop on small pure functions (rounding/tune.py): no model, no Hugging Face."""

from __future__ import annotations

import pytest
import torch

from signround.rounding import BlockInputs, QuantSpec, Recipe, qdq, quantize_weight, tune_block
from signround.rounding.tune import block_loss, masked_mse, quantized_weights, prepare, sample_indices


def _mlp_block(weights, batch: BlockInputs):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].t())
    return batch.hidden + h @ weights["down"].t()


def _problem(seed=0, n=32, d=32, hidden=64):
    gen = torch.Generator().manual_seed(seed)
    weights = {"up": torch.randn(hidden, d, generator=gen) / d**0.5,
               "down": torch.randn(d, hidden, generator=gen) / hidden**0.5}
    x = torch.randn(n, 8, d, generator=gen)
    inputs = BlockInputs(hidden=x)
    targets = _mlp_block(weights, inputs)
    return weights, inputs, targets


SPECS = {"up": QuantSpec(bits=3, group_size=16), "down": QuantSpec(bits=3, group_size=16)}


def test_tuning_lowers_the_block_loss_below_rtn():
    weights, inputs, targets = _problem()
    recipe = Recipe(iters=60, nsamples=32, batch_size=8)
    result = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    rtn = {k: qdq(weights[k], s) for k, s in SPECS.items()}
    tuned = quantized_weights(weights, prepare(weights, SPECS), SPECS, result.params)
    rtn_loss = block_loss(_mlp_block, {**weights, **rtn}, inputs, targets)
    tuned_loss = block_loss(_mlp_block, tuned, inputs, targets)
    assert tuned_loss < 0.9 * rtn_loss
    assert result.best_loss <= result.first_loss
    assert result.losses.shape == (60,)


def test_same_seed_same_result_and_inputs_untouched():
    weights, inputs, targets = _problem(seed=3)
    before = {k: v.clone() for k, v in weights.items()}
    recipe = Recipe(iters=15, nsamples=32, batch_size=4, seed=7)
    a = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    b = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    for k in SPECS:
        for ta, tb in zip(a.params[k].tensors(), b.params[k].tensors()):
            assert torch.equal(ta, tb)
    for k in weights:
        assert torch.equal(weights[k], before[k])


def test_rtn_recipe_returns_unit_params():
    weights, inputs, targets = _problem()
    result = tune_block(_mlp_block, weights, SPECS, inputs, targets, Recipe(iters=0))
    tuned = quantized_weights(weights, prepare(weights, SPECS), SPECS, result.params)
    for k, spec in SPECS.items():
        assert torch.equal(tuned[k], quantize_weight(weights[k], spec).dequantize())


def test_gradient_accumulation_matches_one_big_batch():
    # Two sub-batches of 4 with size weighting = one batch of 8: same loss, same signs, same params.
    weights, inputs, targets = _problem(seed=5)
    r1 = Recipe(iters=5, batch_size=8, gradient_accumulate_steps=1, seed=1)
    r2 = Recipe(iters=5, batch_size=4, gradient_accumulate_steps=2, seed=1)
    a = tune_block(_mlp_block, weights, SPECS, inputs, targets, r1)
    b = tune_block(_mlp_block, weights, SPECS, inputs, targets, r2)
    assert torch.allclose(a.losses, b.losses, rtol=1e-5)
    for k in SPECS:
        assert torch.allclose(a.params[k].v, b.params[k].v)


def test_sample_indices_are_seeded_subsets():
    a = sample_indices(10, 4, 3, seed=0)
    assert [t.tolist() for t in a] == [t.tolist() for t in sample_indices(10, 4, 3, seed=0)]
    assert all(len(set(t.tolist())) == 4 and max(t.tolist()) < 10 for t in a)
    assert all(t.numel() == 10 for t in sample_indices(10, 64, 2, seed=0))


def test_masked_mse_ignores_padding():
    out = torch.zeros(2, 3, 4)
    tgt = torch.zeros(2, 3, 4)
    tgt[1, 2] = 100.0  # only in a padded position
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    assert float(masked_mse(out, tgt, mask)) == 0.0
    assert float(masked_mse(out, tgt)) == pytest.approx(100.0**2 * 4 / 24)
