"""Models dispatched by accelerate (what `from_pretrained(device_map=...)` builds: an AlignDevicesHook
on every block) quantize exactly like plain ones, and keep their placement and hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_batches, tiny_text_model

from signround.adapters import quantize_model
from signround.rounding import QuantSpec, preset

accelerate = pytest.importorskip("accelerate")


def _dispatch(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for block in model.model.layers:
        add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    return model


def test_hooked_model_gives_the_plain_models_weights() -> None:
    model = tiny_text_model("llama")
    batches = random_batches(2, 4, 16)
    spec = QuantSpec(bits=4, group_size=32)
    recipe = preset("default", iters=4, nsamples=8, seqlen=16, batch_size=4)
    plain, _ = quantize_model(copy.deepcopy(model), batches, spec, recipe, device="cpu")
    hooked, _ = quantize_model(_dispatch(copy.deepcopy(model)), batches, spec, recipe, device="cpu")
    for (name, a), (_, b) in zip(plain.state_dict().items(), hooked.state_dict().items()):
        assert torch.equal(a, b), name
    # the hooked forward is still what runs (capture swaps forwards while it records)
    assert all("forward" in block.__dict__ and hasattr(block, "_hf_hook") for block in hooked.model.layers)
    ids = batches[0][:1]
    torch.testing.assert_close(hooked(ids).logits, plain(ids).logits)


def test_blocks_dispatched_elsewhere_are_tuned_on_the_tuning_device_and_keep_their_map() -> None:
    """A device_map may place a block on another GPU; its hook would move the block's inputs there
    while we tune the block on ours. Stand-in for "another device" on a CPU machine: the meta device,
    where any computation fails."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_text_model("llama")
    add_hook_to_module(model.model.layers[1], AlignDevicesHook(execution_device=torch.device("meta"),
                                                               io_same_device=True))
    recipe = preset("default", iters=2, nsamples=8, seqlen=16, batch_size=4)
    _, report = quantize_model(model, random_batches(2, 4, 16), QuantSpec(bits=4, group_size=32), recipe,
                               device="cpu")
    assert report.blocks[1].loss_tuned is not None and not report.skipped
    assert model.model.layers[1]._hf_hook.execution_device == torch.device("meta")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_offloaded_weights_are_refused_before_any_work() -> None:
    model = tiny_text_model("llama")
    model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(
        torch.empty_like(model.model.layers[1].mlp.down_proj.weight, device="meta"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight.*meta device.*offload"):
        quantize_model(model, random_batches(2, 4, 16), QuantSpec(bits=4, group_size=32),
                       preset("default", iters=2, nsamples=8, seqlen=16, batch_size=4), device="cpu")
