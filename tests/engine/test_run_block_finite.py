"""run_block's on-device finiteness flag: what `_fp_targets` checks instead of a pass over the host cache."""

from __future__ import annotations

import attrs
import pytest
import torch

from signround.adapters.engine.device import resolve
from signround.adapters.engine.loop import run_block
from signround.rounding.tune import BlockInputs


def _scale(weights, batch):  # a "block": y = x · s
    return batch.hidden * weights["s"]


@pytest.mark.parametrize("bad_row", [None, 0, 6])
def test_flag_sees_a_non_finite_output_in_any_mini_batch(bad_row):
    x = torch.randn(7, 3, 4)
    if bad_row is not None:
        x[bad_row, 1, 2] = float("nan")
    accel = resolve("cpu")
    finite = torch.ones((), dtype=torch.bool)
    out, _ = run_block(_scale, {"s": torch.tensor(2.0)}, BlockInputs(hidden=x), accel, 3, finite=finite)
    assert bool(finite) is (bad_row is None)
    assert torch.equal(out, x * 2) if bad_row is None else bool(torch.isnan(out[bad_row, 1, 2]))


def test_flag_checks_the_dtype_the_cache_stores():
    """A value finite in float32 but past float16's range is an overflow once cached in float16."""
    accel = attrs.evolve(resolve("cpu"), cache_dtype=torch.float16)
    x = torch.ones(4, 2, 3)
    finite = torch.ones((), dtype=torch.bool)
    out, _ = run_block(_scale, {"s": torch.tensor(1e5)}, BlockInputs(hidden=x), accel, 2, finite=finite)
    assert out.dtype == torch.float16 and torch.isinf(out).all() and not bool(finite)
    finite = torch.ones((), dtype=torch.bool)
    out, _ = run_block(_scale, {"s": torch.tensor(1e3)}, BlockInputs(hidden=x), accel, 2, finite=finite)
    assert bool(finite) and torch.equal(out, torch.full_like(out, 1000.0))


def test_without_the_flag_nothing_is_checked_and_outputs_are_equal():
    x = torch.randn(5, 2, 3)
    accel = resolve("cpu")
    flagged = torch.ones((), dtype=torch.bool)
    a, _ = run_block(_scale, {"s": torch.tensor(3.0)}, BlockInputs(hidden=x), accel, 2, finite=flagged)
    b, _ = run_block(_scale, {"s": torch.tensor(3.0)}, BlockInputs(hidden=x), accel, 2)
    assert torch.equal(a, b) and bool(flagged)
