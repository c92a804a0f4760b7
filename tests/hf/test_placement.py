"""Blocks and outside modules go back into the CPU tensors they came from (`hf.placement`): a model
loaded from safetensors holds views of the memory-mapped checkpoint, and a fresh CPU copy on the way
back would hold its weights twice (issue 16's in-RAM RSS on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from signround.adapters.hf import placement
from signround.adapters.hf.placement import move_outside, on_device, restore


class _ToOther:
    """Stands in for an accelerator on a CPU-only machine: `t.to(device)` gives a new tensor (as a move
    to a GPU does), so what comes back can be told from what went out."""

    def __init__(self, monkeypatch) -> None:
        real = placement._away
        self.sent: list[torch.Tensor] = []

        def away(t, device):
            moved, original = real(t, device)
            moved = moved.clone()  # on a GPU this is a new tensor too
            self.sent.append(moved)
            return moved, original

        monkeypatch.setattr(placement, "_away", away)


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8, bias=False))
    block.register_buffer("table", torch.arange(4.0))
    return block


def test_on_device_writes_back_into_the_original_tensors(monkeypatch):
    block = _block()
    before = {n: t.data_ptr() for n, t in [*block.named_parameters(), *block.named_buffers()]}
    moves = _ToOther(monkeypatch)
    with on_device(block, torch.device("cpu:0")):
        now = {n: t.data_ptr() for n, t in [*block.named_parameters(), *block.named_buffers()]}
        assert all(now[n] != before[n] for n in before), "the block was not moved"
        with torch.no_grad():
            block[0].weight.fill_(3.0)  # what write_back does on the device
            block.table.add_(1.0)
    after = {n: t.data_ptr() for n, t in [*block.named_parameters(), *block.named_buffers()]}
    assert after == before  # the same storages: nothing allocated anew on the CPU
    assert torch.equal(block[0].weight, torch.full((16, 8), 3.0))  # with the values computed away
    assert torch.equal(block.table, torch.arange(4.0) + 1)
    assert len(moves.sent) == 6


def test_on_device_restores_on_errors_and_keeps_shared_parameters_shared(monkeypatch):
    block = _block()
    block.append(nn.Linear(8, 16))
    block[3].weight = block[0].weight  # tied
    ptr = block[0].weight.data_ptr()
    _ToOther(monkeypatch)
    try:
        with on_device(block, torch.device("cpu:0")):
            assert block[3].weight is block[0].weight
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert block[0].weight.data_ptr() == ptr and block[3].weight is block[0].weight


def test_a_tensor_that_changed_shape_or_dtype_comes_back_as_a_new_tensor(monkeypatch):
    block = _block()
    _ToOther(monkeypatch)
    moved = move_outside(block, (), torch.device("cpu:0"))
    block.table = torch.zeros(2, dtype=torch.float64)  # replaced while away
    restore(moved)
    assert block.table.dtype == torch.float64 and block.table.shape == (2,)


def test_a_block_of_a_loaded_checkpoint_comes_back_into_its_mapped_file(tmp_path, monkeypatch):
    from tiny_models import tiny_text_model
    from transformers import AutoModelForCausalLM

    tiny_text_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    block = model.model.layers[0]
    w = block.mlp.up_proj.weight
    ptr, stored = w.data_ptr(), w.detach().clone()
    _ToOther(monkeypatch)
    with on_device(block, torch.device("cpu:0")):
        with torch.no_grad():
            block.mlp.up_proj.weight.mul_(2)
    assert block.mlp.up_proj.weight.data_ptr() == ptr
    assert torch.equal(block.mlp.up_proj.weight, stored * 2)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path).model.layers[0].mlp.up_proj.weight
    assert torch.equal(reread, stored)  # the checkpoint file is untouched (a private mapping)
