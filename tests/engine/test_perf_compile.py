"""The fast tuning path (compiled qdq + fused signed step, as used on CUDA) gives the same values
as the eager path. Runs on the CPU: inductor's CPU backend, or the eager fallback when the
compiler is unavailable (then the fallback itself is what is checked)."""

from __future__ import annotations

import warnings

import torch

from signround.rounding import BlockInputs, QuantSpec, Recipe, tune_block
from signround.rounding import signsgd
from signround.rounding.grid import group_weight, qdq_grouped
from signround.rounding.params import RoundingParams
from signround.rounding.tune import sample_indices


def _block(weights, batch: BlockInputs):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].t())
    return batch.hidden + h @ weights["down"].t()


def _problem(seed=0, n=16, d=32, hidden=64):
    gen = torch.Generator().manual_seed(seed)
    weights = {"up": torch.randn(hidden, d, generator=gen) / d**0.5,
               "down": torch.randn(d, hidden, generator=gen) / hidden**0.5}
    inputs = BlockInputs(hidden=torch.randn(n, 8, d, generator=gen))
    return weights, inputs, _block(weights, inputs)


SPECS = {"up": QuantSpec(bits=4, group_size=16), "down": QuantSpec(bits=4, group_size=16, sym=False)}


def test_compiled_step_matches_eager():
    weights, inputs, targets = _problem()
    recipe = Recipe(iters=8, nsamples=16, batch_size=4)
    eager = tune_block(_block, weights, SPECS, inputs, targets, recipe, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a compiler-less machine falls back to eager
        fast = tune_block(_block, weights, SPECS, inputs, targets, recipe, compile=True)
    assert torch.allclose(eager.losses, fast.losses, rtol=1e-4, atol=1e-7)
    for k in SPECS:
        for a, b in zip(eager.params[k].tensors(), fast.params[k].tensors()):
            assert torch.allclose(a, b, atol=1e-6)


def test_fused_layer_step_equals_update():
    gen = torch.Generator().manual_seed(3)
    p = {"w": RoundingParams(torch.randn(4, 8, generator=gen), torch.rand(4, 1, generator=gen),
                             torch.rand(4, 1, generator=gen))}
    g = {"w": RoundingParams(torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen),
                             torch.zeros(4, 1))}
    cfg = signsgd.SignSGDConfig(lr=0.01, minmax_lr=0.02, iters=10)
    s0 = signsgd.init(p, cfg)
    a, sa = signsgd.update(g, p, s0, torch.tensor(1.0))
    b, sb = signsgd.update_with(signsgd.layer_step, signsgd.lr_table(cfg), g, p, s0, torch.tensor(1.0))
    for x, y in zip(a["w"].tensors() + sa.best["w"].tensors(), b["w"].tensors() + sb.best["w"].tensors()):
        assert torch.equal(x, y)
    assert float(sa.best_loss) == float(sb.best_loss) and sa.step == sb.step


def test_bf16_grouped_weight_gives_the_same_qdq_as_fp32():
    w = (torch.randn(16, 40) * 0.1).to(torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=16)
    p = RoundingParams(torch.rand(16, 40) - 0.5, torch.rand(16, 3), torch.rand(16, 3))
    a = qdq_grouped(group_weight(w, spec), spec, p)
    b = qdq_grouped(group_weight(w.float(), spec), spec, p).to(torch.bfloat16)
    assert group_weight(w, spec).grouped.dtype == torch.bfloat16
    assert torch.equal(a, b)


def test_sampler_uses_every_sample_once_per_epoch():
    rows = sample_indices(16, 4, 8, seed=1)
    first, second = torch.cat(rows[:4]), torch.cat(rows[4:])
    assert sorted(first.tolist()) == list(range(16)) == sorted(second.tolist())
