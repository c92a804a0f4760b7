"""Runtime policy (adapters/engine/runtime.py): which qdq path runs, and that the compiled one
computes what the eager one does. Runs on the CPU with inductor's CPU backend; skipped where
torch.compile cannot build here (then the fallback is what is tested)."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch

from signround.adapters.engine import env as environment
from signround.adapters.engine import runtime
from signround.adapters.engine.device import resolve
from signround.rounding import BlockInputs, QuantSpec, Recipe, qdq_vjp, tune_block


def _block(weights, batch: BlockInputs):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].float().t())
    return batch.hidden + h @ weights["down"].float().t()


def _problem(seed=0, n=16, d=32, hidden=64):
    gen = torch.Generator().manual_seed(seed)
    weights = {"up": (torch.randn(hidden, d, generator=gen) / d**0.5).bfloat16(),
               "down": (torch.randn(d, hidden, generator=gen) / hidden**0.5).bfloat16()}
    inputs = BlockInputs(hidden=torch.randn(n, 8, d, generator=gen))
    return weights, inputs, _block(weights, inputs)


SPECS = {"up": QuantSpec(bits=4, group_size=16), "down": QuantSpec(bits=4, group_size=16, sym=False)}


def test_policy_compiles_on_cuda_only_unless_the_environment_says_so(monkeypatch):
    cpu = resolve("cpu")
    monkeypatch.delenv("SIGNROUND_COMPILE", raising=False)
    assert runtime.policy(cpu).compile is False
    monkeypatch.setenv("SIGNROUND_COMPILE", "1")
    assert runtime.policy(cpu).compile is True
    monkeypatch.setenv("SIGNROUND_COMPILE", "maybe")
    with pytest.raises(ValueError, match="SIGNROUND_COMPILE='maybe' must be 0 or 1"):
        environment.read()
    assert runtime.qdq_ops(runtime.Runtime(compile=False, compile_block=False), cpu.device).vjp is qdq_vjp


def test_compiled_step_runs_and_matches_eager():
    cpu = resolve("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = runtime.qdq_ops(runtime.Runtime(compile=True, compile_block=False), cpu.device, SPECS["up"])
    if ops.vjp is qdq_vjp:  # the compiler is unavailable here: the fallback warned and chose eager
        assert any("running eager" in str(w.message) for w in caught)
        pytest.skip("torch.compile cannot build on this machine")
    weights, inputs, targets = _problem()
    recipe = Recipe(iters=8, nsamples=16, batch_size=4)
    eager = tune_block(_block, weights, SPECS, inputs, targets, recipe)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    fast = tune_block(_block, weights, SPECS, inputs, targets, recipe, ops=ops)
    # The probe compiled what tuning runs on its grid (the weights' dtype, the vjp with grad mode off as
    # in autograd's backward): the only new graphs are the two halves for "down"'s other grid (asym).
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    # inductor honours the fp16 rounding of scales (emulate_precision_casts): codes and v gradients
    # are the eager ones; alpha/beta gradient sums may reassociate (spec/rounding.md, tolerance).
    assert torch.allclose(eager.losses, fast.losses, rtol=1e-5, atol=1e-8)
    for k in SPECS:
        same = (eager.quantized[k].codes == fast.quantized[k].codes).float().mean()
        assert float(same) > 0.999, k
    # The compiled whole-layer step (vjp, best select and signed step in one function) against the
    # compiled vjp followed by the eager select and step: the same values bit for bit.
    assert ops.step is not None
    unfused = tune_block(_block, weights, SPECS, inputs, targets, recipe, ops=attrs.evolve(ops, step=None))
    assert torch.equal(unfused.losses, fast.losses)
    for k in SPECS:
        assert torch.equal(unfused.quantized[k].codes, fast.quantized[k].codes), k
        assert all(torch.equal(a, b) for a, b in zip(unfused.params[k].tensors(), fast.params[k].tensors())), k


def test_step_batches_split_across_ranks_and_mark_each_step(monkeypatch):
    from signround.adapters.engine.distributed import DataParallel

    calls = []
    accel = resolve("cpu")
    accel = type(accel)(device=accel.device, store_device=accel.store_device, after_step=lambda: calls.append(1))
    _, inputs, targets = _problem(n=16)
    recipe = Recipe(iters=3, nsamples=16, batch_size=8, gradient_accumulate_steps=1)
    one = list(runtime.step_batches(inputs, targets, recipe, accel))
    assert len(calls) == 3  # mark_step after every step, the last one included
    ranks = [list(runtime.step_batches(inputs, targets, recipe, accel, DataParallel(rank=r, world=2)))
             for r in range(2)]
    for t in range(3):
        (whole, total), = [one[t]]
        assert total == 8 and all(parts[t][1] == 8 for parts in ranks)
        halves = torch.cat([ranks[r][t][0][0][0].hidden for r in range(2)])
        assert torch.equal(halves, whole[0][0].hidden)  # rank r holds the r-th half of the same step batch
    with pytest.raises(ValueError, match="at least one sample per rank"):
        list(runtime.step_batches(inputs, targets, Recipe(iters=1, batch_size=1), accel, DataParallel(0, 2)))


def test_the_block_compile_follows_the_block_size_unless_forced():
    """Left to the size (CUDA, variable unset), large blocks get the compiled block call and small
    ones the eager call (they get CUDA graphs instead); 0/1 force it either way."""
    from signround.adapters.hf.pure import call_block

    small = torch.nn.Module()
    small.proj = torch.nn.Linear(64, 64, device="meta")
    large = torch.nn.Module()
    large.proj = torch.nn.Linear(8192, runtime.GRAPHS_MAX_WEIGHTS // 8192 + 1, device="meta")
    specs = {"proj.weight": QuantSpec()}
    auto = runtime.Runtime(compile=True, compile_block=None)
    assert runtime.block_call_for(auto, small, specs) is call_block
    assert runtime.block_call_for(auto, large, specs) is not call_block
    assert runtime.block_call_for(runtime.Runtime(compile=True, compile_block=False), large, specs) is call_block
    assert runtime.block_call_for(runtime.Runtime(compile=True, compile_block=True), small, specs) is not call_block
    assert runtime.policy(resolve("cpu")).compile_block is False  # CUDA only
