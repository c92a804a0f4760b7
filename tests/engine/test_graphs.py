"""Steps replayed from a capture (adapters/engine/graphs.py), on the CPU: the capture is a stand-in
that replays the captured step function on the same static buffers, so the plumbing around a CUDA
graph (warm-up, static batch buffers, in-place state, fallbacks) is checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from signround.adapters.engine import graphs
from signround.rounding import BlockInputs, QuantSpec, Recipe, tune_block
from signround.rounding import tune as core

SPECS = {"up": QuantSpec(bits=3, group_size=16), "down": QuantSpec(bits=3, group_size=16, sym=False)}


def _block(weights, batch: BlockInputs):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].float().t())
    out = batch.hidden + h @ weights["down"].float().t()
    return out * batch.per_sample["scale"][:, None, None]


def _problem(seed=0, n=24, d=32, hidden=64):
    gen = torch.Generator().manual_seed(seed)
    weights = {"up": torch.randn(hidden, d, generator=gen) / d**0.5, "down": torch.randn(d, hidden, generator=gen) / hidden**0.5}
    inputs = BlockInputs(hidden=torch.randn(n, 8, d, generator=gen), per_sample={"scale": 1 + torch.rand(n, generator=gen)},
                         loss_mask=(torch.rand(n, 8, generator=gen) > 0.2).float())
    return weights, inputs, _block(weights, inputs)


@pytest.fixture(autouse=True)
def _fresh_process_state():
    graphs._FAILED.clear()
    graphs._SYNCED.clear()
    yield
    graphs._FAILED.clear()
    graphs._SYNCED.clear()


def _same(a, b) -> None:
    assert torch.equal(a.losses, b.losses)
    for k in SPECS:
        qa, qb = a.quantized[k], b.quantized[k]
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
        assert all(torch.equal(x, y) for x, y in zip(a.params[k].tensors(), b.params[k].tensors()))


def test_replayed_steps_equal_the_core_loop_bit_for_bit():
    weights, inputs, targets = _problem()
    recipe = Recipe(iters=14, nsamples=24, batch_size=8, seed=3)  # 24 = 3 steps an epoch: batches change
    captures = []

    def capture(fn, stream):
        captures.append(fn)
        return graphs.deferred_capture(fn, stream)

    replayed = graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe),
                                   capture=capture)
    _same(replayed, tune_block(_block, weights, SPECS, inputs, targets, recipe))
    assert len(captures) == 1 and graphs.failure() is None


def test_a_failed_capture_warns_once_and_gives_the_same_values():
    weights, inputs, targets = _problem(seed=1)
    recipe = Recipe(iters=8, nsamples=24, batch_size=8)

    def broken(fn, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the tuning step failed"):
        out = graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe),
                                  capture=broken)
    _same(out, tune_block(_block, weights, SPECS, inputs, targets, recipe))
    assert "stream is capturing" in graphs.failure()


def test_a_warm_up_step_that_synchronised_is_still_captured_and_reported():
    """The sync debug mode's report does not stop the capture (a real host read fails the capture,
    which then falls back); it is kept, and named when a capture fails."""
    weights, inputs, targets = _problem(seed=4)
    recipe = Recipe(iters=8, nsamples=24, batch_size=8)
    checked = []

    def sync_check(fn):
        checked.append(1)
        return fn(), ["block.py:7: called a synchronizing CUDA operation"]

    captures = []

    def capture(fn, stream):
        captures.append(fn)
        return graphs.deferred_capture(fn, stream)

    out = graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe),
                              capture=capture, sync_check=sync_check)
    _same(out, tune_block(_block, weights, SPECS, inputs, targets, recipe))
    assert checked == [1] and len(captures) == 1 and graphs.failure() is None  # the last warm-up step only
    assert list(graphs.warmup_syncs().values()) == ["block.py:7: called a synchronizing CUDA operation"]

    def broken(fn, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._FAILED.clear()
    with pytest.warns(RuntimeWarning, match="synchronised the host: block.py:7"):
        graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe),
                            capture=broken, sync_check=sync_check)


def test_steps_that_cannot_be_replayed_run_eagerly():
    """A step of another shape (here: the last of an uneven epoch) and accumulation steps run
    through the core's step, with the same values as the core loop."""
    weights, inputs, targets = _problem(seed=2)
    recipe = Recipe(iters=9, nsamples=24, batch_size=8)
    steps = list(core.step_batches(inputs, targets, recipe))
    subs, total = steps[6]
    short = [(subs[0][0].select(torch.arange(5)), subs[0][1][:5])]
    steps[6] = (short, 5)
    accumulated = [(b.select(torch.arange(k, k + 4)), t[k:k + 4]) for b, t in subs for k in (0, 4)]
    steps[7] = (accumulated, 8)
    replayed = graphs.tune_graphed(_block, weights, SPECS, recipe, steps, capture=graphs.deferred_capture)
    _same(replayed, tune_block(_block, weights, SPECS, inputs, targets, recipe, batches=steps))
    assert not graphs.capturable(steps[7]) and graphs.capturable(steps[8])


def test_the_runtime_uses_graphs_only_when_asked_on_cuda(monkeypatch):
    from signround.adapters.engine import env, runtime
    from signround.adapters.engine.device import resolve

    monkeypatch.setenv("SIGNROUND_CUDA_GRAPHS", "1")
    assert env.read().cuda_graphs
    assert runtime.policy(resolve("cpu")).cuda_graphs is False  # CUDA graphs are CUDA's
    small, large = {"w": torch.zeros(4, 4)}, {"w": torch.zeros(1, runtime.GRAPHS_MAX_WEIGHTS + 1)}
    spec = {"w": QuantSpec()}
    auto = runtime.Runtime(compile=True, compile_block=False, cuda_graphs=None)  # CUDA, variable unset
    assert runtime.uses_graphs(auto, small, spec) and not runtime.uses_graphs(auto, large, spec)
    forced = runtime.Runtime(compile=True, compile_block=False, cuda_graphs=True)
    assert runtime.uses_graphs(forced, large, spec) and not runtime.uses_graphs(forced, small, {})
    off = runtime.Runtime(compile=True, compile_block=False, cuda_graphs=False)
    assert not runtime.uses_graphs(off, small, spec)
    # vision towers keep eager steps unless forced; the text decoder follows the size
    assert runtime.for_block_list(auto, "model.visual.blocks").cuda_graphs is False
    assert runtime.for_block_list(auto, "model.language_model.layers").cuda_graphs is None
    assert runtime.for_block_list(forced, "model.visual.blocks").cuda_graphs is True
    monkeypatch.setenv("SIGNROUND_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="SIGNROUND_CUDA_GRAPHS"):
        env.read()


def test_a_layout_that_cannot_be_captured_leaves_other_layouts_captured():
    """Vision and text blocks have different layer names: a vision block that cannot be captured
    (its forward reads the host) must not turn graphs off for the text decoder."""
    weights, inputs, targets = _problem(seed=3)
    recipe = Recipe(iters=6, nsamples=24, batch_size=8)

    def broken(fn, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning):
        graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe), capture=broken)
    captured = []
    only_up = {"up": SPECS["up"]}
    graphs.tune_graphed(_block, weights, only_up, recipe, core.step_batches(inputs, targets, recipe),
                        capture=lambda fn, stream: captured.append(fn) or fn)
    assert len(captured) == 1
    again = []
    graphs.tune_graphed(_block, weights, SPECS, recipe, core.step_batches(inputs, targets, recipe),
                        capture=lambda fn, stream: again.append(fn) or fn)
    assert again == []  # the failed layout is not tried again in this process
