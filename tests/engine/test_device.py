"""Device selection and the Gaudi (HPU) contract, with a stand-in for habana_frameworks.torch.

Verified here: with a stand-in `habana_frameworks.torch.core`, "hpu" is chosen (explicitly, and
automatically when no cuda/xpu is present), autocast is bf16, the cache lives on the CPU with
low_gpu_mem_usage, and mark_step runs once after every optimizer step and after every evaluation
batch of quantize_model. Not verified: anything that needs a Gaudi (kernels, lazy-graph
behaviour, HPU memory statistics).
"""

from __future__ import annotations

import sys
import types

import attrs
import pytest
import torch
from tiny_models import random_batches, tiny_text_model

from signround.adapters import quantize_model
from signround.adapters.engine.device import default_device, hpu_available, resolve
from signround.rounding import QuantSpec, preset


@pytest.fixture
def fake_habana(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    calls = types.SimpleNamespace(mark_step=0)
    root = types.ModuleType("habana_frameworks")
    pkg = types.ModuleType("habana_frameworks.torch")
    core = types.ModuleType("habana_frameworks.torch.core")
    hpu = types.ModuleType("habana_frameworks.torch.hpu")

    def mark_step() -> None:
        calls.mark_step += 1

    core.mark_step = mark_step  # type: ignore[attr-defined]
    hpu.is_available = lambda: True  # type: ignore[attr-defined]
    hpu.max_memory_allocated = lambda: 123  # type: ignore[attr-defined]
    root.torch = pkg  # type: ignore[attr-defined]
    pkg.core, pkg.hpu = core, hpu  # type: ignore[attr-defined]
    for name, mod in [("habana_frameworks", root), ("habana_frameworks.torch", pkg),
                      ("habana_frameworks.torch.core", core), ("habana_frameworks.torch.hpu", hpu)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    acc = resolve("cpu")
    assert acc.device.type == "cpu" and acc.autocast_dtype is None and acc.after_step is None
    assert acc.store_device.type == "cpu"


def test_hpu_requires_habana() -> None:
    if hpu_available():
        pytest.skip("a real habana_frameworks is installed")
    with pytest.raises(RuntimeError, match="habana_frameworks"):
        resolve("hpu")


def test_cuda_settings_are_bf16_and_the_cache_lives_on_the_host_by_default() -> None:
    acc = resolve("cuda", low_gpu_mem_usage=True)  # resolving needs no GPU
    assert acc.autocast_dtype == torch.bfloat16 and acc.store_device == torch.device("cpu") and acc.pinned_cache
    assert resolve("cuda", amp=False).autocast_dtype is None
    assert resolve("cuda").store_device == torch.device("cpu")  # auto: pinned host memory, rows streamed ahead
    assert resolve("cuda", cache="device").store_device == torch.device("cuda")
    assert resolve("cpu").store_device == torch.device("cpu") and not resolve("cpu").pinned_cache
    disk = resolve("cuda", cache="disk", cache_dir="/somewhere")  # memory-mapped files, not pinned
    assert disk.store_device == torch.device("cpu") and str(disk.cache_dir) == "/somewhere" and not disk.pinned_cache
    with pytest.raises(ValueError, match="cache placement must be one of"):
        resolve("cuda", cache="nvme")


def test_hpu_contract_with_a_stand_in(fake_habana: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert hpu_available() and default_device() == torch.device("hpu")
    acc = resolve(None, low_gpu_mem_usage=True)
    assert acc.device == torch.device("hpu") and acc.autocast_dtype == torch.bfloat16
    assert acc.store_device == torch.device("cpu")
    acc.after_step()
    assert fake_habana.mark_step == 1

    # Run the engine on the CPU with the HPU step hook: mark_step after every step and eval batch.
    cpu_hpu = attrs.evolve(acc, device=torch.device("cpu"), store_device=torch.device("cpu"),
                           autocast_dtype=None, cache_dtype=None)
    fake_habana.mark_step = 0
    iters, nsamples, bs, blocks = 7, 8, 4, 2
    recipe = preset("default", iters=iters, nsamples=nsamples, batch_size=bs)
    _, report = quantize_model(tiny_text_model("llama", num_hidden_layers=blocks), random_batches(2, 4, 16),
                               QuantSpec(group_size=32), recipe, device=cpu_hpu)
    eval_batches = 4 * (nsamples // bs)  # fp targets, RTN loss, tuned loss, final outputs
    assert fake_habana.mark_step == blocks * (iters + eval_batches)
    assert len(report.blocks) == blocks
