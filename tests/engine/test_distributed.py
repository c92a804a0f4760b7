"""Data parallel: `torchrun --nproc-per-node 2 -m signround quantize` (gloo on CPU) splits each step's
batch across the ranks: it gives exactly the checkpoint of one process that takes the same step
batches and cuts each into the same sub-batches (half the batch size, twice the accumulation)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import save_tiny_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-llama-dp"))


def _args(model_dir: Path, out: Path, batch_size: int, gas: int) -> list[str]:
    return ["quantize", str(model_dir), "-o", str(out), "--group-size", "32", "--iters", "10", "--nsamples", "16",
            "--seqlen", "32", "--batch-size", str(batch_size), "--gradient-accumulate-steps", str(gas),
            "--device", "cpu"]


def test_two_ranks_equal_one_process(model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "signround", *_args(model_dir, single, batch_size=2, gas=2)], check=True,
                   capture_output=True)
    dp = tmp_path / "dp"
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "signround",
                          *_args(model_dir, dp, batch_size=4, gas=1)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(dp / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reduce_sums_over_ranks_single_process_group(tmp_path):
    import torch.distributed as dist

    from signround.adapters.engine.distributed import DataParallel
    from signround.rounding import RoundingParams

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dp = DataParallel(rank=0, world=1)
        g = {"w": RoundingParams(torch.randn(3, 4), torch.rand(3, 1), torch.rand(3, 1))}
        loss, out = dp.reduce(torch.tensor(2.5), g)
        assert float(loss) == 2.5
        assert all(torch.equal(x, y) for x, y in zip(out["w"].tensors(), g["w"].tensors()))
    finally:
        dist.destroy_process_group()


def test_reduced_loss_does_not_keep_the_gradient_buffer(tmp_path):
    """Every step's loss is kept for the history; as a view it would pin that step's whole
    all-reduce buffer (all gradients) until the block ends."""
    import torch.distributed as dist

    from signround.adapters.engine.distributed import DataParallel
    from signround.rounding import RoundingParams

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        g = {"w": RoundingParams(torch.randn(64, 64), torch.rand(64, 1), torch.rand(64, 1))}
        loss, _ = DataParallel(rank=0, world=1).reduce(torch.tensor(1.0), g)
        assert loss.untyped_storage().nbytes() == loss.element_size()
    finally:
        dist.destroy_process_group()


def test_too_few_samples_per_rank_is_refused_before_tuning():
    from signround.adapters.engine.runtime import check_ranks
    from signround.rounding import preset

    with pytest.raises(ValueError, match="at least one sample per rank"):
        check_ranks(preset("default", iters=2, batch_size=1, nsamples=4), 2)
    check_ranks(preset("default", iters=2, batch_size=2, nsamples=4), 2)  # one sample each: fine
    check_ranks(preset("rtn", batch_size=1), 2)  # nothing to split without tuning
