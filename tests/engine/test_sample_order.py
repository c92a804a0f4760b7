"""The accuracy harness's replay of auto-round's sample order (issue 19: paired runs of the two tuners)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch


def _harness():
    spec = importlib.util.spec_from_file_location("accuracy_bench", Path(__file__).parents[1] / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("nsamples", "per_step", "iters"), [(16, 4, 16), (10, 4, 7), (8, 8, 3)])
def test_replayed_order_is_auto_rounds_index_sampler_across_blocks(nsamples: int, per_step: int, iters: int) -> None:
    utils = pytest.importorskip("auto_round.compressors.utils")
    order = _harness().AutoRoundOrder(seed=5)
    random.seed(5)  # what auto-round's set_seed does to the stream its sampler shuffles with
    for block in range(3):  # one sampler per block, the stream carried on
        sampler = utils.IndexSampler(nsamples, per_step)
        theirs = [sampler.next_batch() for _ in range(iters)]
        ours = order(nsamples, per_step, iters, seed=block)  # the block's own seed is ignored
        assert [t.tolist() for t in ours] == theirs and all(t.dtype == torch.int64 for t in ours)


def test_replay_patches_the_engine_only_inside() -> None:
    from signround.adapters.engine import runtime

    harness, record = _harness(), []
    before = runtime.sample_indices, runtime.tune
    with harness.replaying(harness.AutoRoundOrder(0), record):
        assert isinstance(runtime.sample_indices, harness.AutoRoundOrder) and runtime.tune is not before[1]
    assert (runtime.sample_indices, runtime.tune) == before
