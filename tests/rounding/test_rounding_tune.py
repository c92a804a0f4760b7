"""The tuning loop on small pure functions (rounding/tune.py): no model, no Hugging Face."""

from __future__ import annotations

import pytest
import torch

from signround import rounding as sr
from signround.rounding import BlockInputs, QuantSpec, Recipe, qdq, quantize_weight, tune_block
from signround.rounding.tune import block_loss, masked_mse, sample_indices


def _mlp_block(weights, batch: BlockInputs):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].float().t())
    return batch.hidden + h @ weights["down"].float().t()


def _problem(seed=0, n=32, d=32, hidden=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weights = {"up": (torch.randn(hidden, d, generator=gen) / d**0.5).to(dtype),
               "down": (torch.randn(d, hidden, generator=gen) / hidden**0.5).to(dtype)}
    x = torch.randn(n, 8, d, generator=gen)
    inputs = BlockInputs(hidden=x)
    targets = _mlp_block({k: v.float() for k, v in weights.items()}, inputs)
    return weights, inputs, targets


SPECS = {"up": QuantSpec(bits=3, group_size=16), "down": QuantSpec(bits=3, group_size=16, sym=False)}


def _dequantized(weights, result):
    return {**weights, **{k: q.dequantize(weights[k].dtype) for k, q in result.quantized.items()}}


def _same_quantized(a, b) -> bool:
    return all(torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scale, b[k].scale)
               and torch.equal(a[k].zero, b[k].zero) for k in a)


def test_tuning_lowers_the_block_loss_below_rtn():
    weights, inputs, targets = _problem()
    recipe = Recipe(iters=60, nsamples=32, batch_size=8)
    result = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    rtn = {k: qdq(weights[k], s) for k, s in SPECS.items()}
    rtn_loss = block_loss(_mlp_block, {**weights, **rtn}, inputs, targets)
    tuned_loss = block_loss(_mlp_block, _dequantized(weights, result), inputs, targets)
    assert tuned_loss < 0.9 * rtn_loss
    assert result.best_loss < result.first_loss
    assert result.losses.shape == (60,)


def test_the_readme_custom_loop_is_tune_block():
    """The five-line loop of the module docstring gives exactly what tune_block gives."""
    weights, inputs, targets = _problem(seed=2)
    recipe = Recipe(iters=12, nsamples=32, batch_size=4, seed=3)
    prepared = sr.prepare(weights, SPECS)
    state = sr.init(prepared, SPECS, recipe)
    losses = []
    for parts in sr.step_batches(inputs, targets, recipe):
        state, loss = sr.step(_mlp_block, weights, prepared, SPECS, state, parts)
        losses.append(loss)
    by_hand = sr.result(state, prepared, SPECS, recipe)
    ref = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    assert _same_quantized(by_hand, ref.quantized)
    assert torch.equal(torch.stack(losses), ref.losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_accumulate_then_update(dtype):
    """The in-backward step (one sub-batch, no reduce) and the accumulate → update path give the
    same params, best iterate and losses bit for bit (an identity reduce forces the second path)."""
    weights, inputs, targets = _problem(seed=4, dtype=dtype)
    recipe = Recipe(iters=10, nsamples=32, batch_size=8, seed=5)
    fused = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    plain = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe, reduce=lambda loss, grads: (loss, grads))
    assert torch.equal(fused.losses, plain.losses)
    assert _same_quantized(fused.quantized, plain.quantized)
    for k in SPECS:
        assert all(torch.equal(a, b) for a, b in zip(fused.params[k].tensors(), plain.params[k].tensors()))


@pytest.mark.parametrize("reduce", [None, "identity"])
def test_donated_step_equals_a_non_donated_one_and_never_touches_its_input(reduce):
    weights, inputs, targets = _problem(seed=6)
    recipe = Recipe(iters=3, nsamples=32, batch_size=8)
    fn = None if reduce is None else (lambda loss, grads: (loss, grads))
    prepared = sr.prepare(weights, SPECS)
    s0 = sr.init(prepared, SPECS, recipe)
    s0, _ = sr.step(_mlp_block, weights, prepared, SPECS, s0, next(sr.step_batches(inputs, targets, recipe)))
    snapshot = {k: p.map(torch.clone) for k, p in s0.params.items()}
    codes = {k: c.clone() for k, c in s0.best.codes.items()}
    parts = next(sr.step_batches(inputs, targets, recipe))
    s1, l1 = sr.step(_mlp_block, weights, prepared, SPECS, s0, parts, reduce=fn)
    assert int(s0.opt.step) == 1  # the step count is state too: not advanced in the input
    for k in SPECS:
        assert all(torch.equal(a, b) for a, b in zip(snapshot[k].tensors(), s0.params[k].tensors()))
        assert torch.equal(codes[k], s0.best.codes[k])
    s2, l2 = sr.step(_mlp_block, weights, prepared, SPECS, s0, parts, reduce=fn, donate=True)
    assert torch.equal(l1, l2) and int(s1.opt.step) == int(s2.opt.step) == 2
    for k in SPECS:
        assert all(torch.equal(a, b) for a, b in zip(s1.params[k].tensors(), s2.params[k].tensors()))
        assert torch.equal(s1.best.codes[k], s2.best.codes[k])
        assert s2.params[k].v.data_ptr() == s0.params[k].v.data_ptr()  # donated: the same buffer
    assert s2.opt.step.data_ptr() == s0.opt.step.data_ptr()  # a graph replay advances the same buffer


def test_same_seed_same_result_and_inputs_untouched():
    weights, inputs, targets = _problem(seed=3)
    before = {k: v.clone() for k, v in weights.items()}
    recipe = Recipe(iters=15, nsamples=32, batch_size=4, seed=7)
    a = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    b = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    assert _same_quantized(a.quantized, b.quantized)
    for k in weights:
        assert torch.equal(weights[k], before[k])
    c = tune_block(_mlp_block, weights, SPECS, inputs, targets, Recipe(iters=15, nsamples=32, batch_size=4, seed=8))
    assert not torch.equal(a.losses, c.losses)  # another seed draws other batches


def test_rtn_recipe_returns_the_rtn_grid():
    weights, inputs, targets = _problem()
    result = tune_block(_mlp_block, weights, SPECS, inputs, targets, Recipe(iters=0))
    assert _same_quantized(result.quantized, {k: quantize_weight(weights[k], s) for k, s in SPECS.items()})


def test_last_iterate_without_use_best():
    weights, inputs, targets = _problem(seed=9)
    recipe = Recipe(iters=8, nsamples=32, batch_size=8, use_best=False)
    result = tune_block(_mlp_block, weights, SPECS, inputs, targets, recipe)
    last = {k: quantize_weight(weights[k], s, result.params[k]) for k, s in SPECS.items()}
    assert _same_quantized(result.quantized, last)
    assert result.best_loss == float(result.losses[-1])


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


def test_sampler_uses_every_sample_once_per_epoch():
    rows = sample_indices(16, 4, 8, seed=1)
    first, second = torch.cat(rows[:4]), torch.cat(rows[4:])
    assert sorted(first.tolist()) == list(range(16)) == sorted(second.tolist())


def test_masked_mse_ignores_padding():
    out = torch.zeros(2, 3, 4)
    tgt = torch.zeros(2, 3, 4)
    tgt[1, 2] = 100.0  # only in a padded position
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    assert float(masked_mse(out, tgt, mask)) == 0.0
    assert float(masked_mse(out, tgt)) == pytest.approx(100.0**2 * 4 / 24)
