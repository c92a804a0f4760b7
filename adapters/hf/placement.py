"""Where a model's tensors live while its blocks are quantized one at a time.

    check_materialized(model)                      # refuse accelerate's disk offload up front
    moved = move_outside(model, prefixes, device)  # embeddings, norms, rotary tables → device
    try:
        with on_device(block, device): ...         # one block at a time on the device
    finally:
        restore(moved)                             # everything back where it was

A model dispatched over several devices by accelerate keeps its map: each tensor goes back to the
device it came from, and the AlignDevicesHooks of a block point at the compute device only while
the block is there.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

Placement = list[tuple[nn.Module, str, bool, torch.device]]


def move_outside(model: nn.Module, prefixes: Iterable[str], device: torch.device) -> Placement:
    """Move every parameter and buffer that is not inside the block lists to `device`; returns
    where each one was, for `restore`."""
    skip = tuple(p + "." for p in prefixes)
    moved: Placement = []
    for name, module in model.named_modules():
        if name.startswith(skip) or any(name == p[:-1] for p in skip):
            continue
        for key, p in list(module._parameters.items()):
            if p is not None and p.device != device:
                moved.append((module, key, True, p.device))
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                moved.append((module, key, False, b.device))
                module._buffers[key] = b.to(device)
    return moved


def restore(moved: Placement) -> None:
    """Put back what `move_outside` moved."""
    for module, key, is_param, device in moved:
        if is_param:
            p = module._parameters[key]
            if p is not None:
                p.data = p.data.to(device)
        elif module._buffers.get(key) is not None:
            module._buffers[key] = module._buffers[key].to(device)


def check_materialized(model: nn.Module, streamed: Iterable[str] = ()) -> None:
    """Weights offloaded by accelerate (on the meta device, read from disk/CPU by hooks) cannot be
    tuned in place: say so before any work is done. streamed: block-list prefixes whose weights
    are read block by block from the checkpoint (`hf.streaming`), on the meta device by design."""
    inside = tuple(p + "." for p in streamed)
    for name, p in model.named_parameters():
        if p.device.type == "meta" and not (inside and name.startswith(inside)):
            raise ValueError(f"parameter {name!r} is on the meta device (offloaded by accelerate's device_map / "
                             "offload_folder); load the model without disk offload (device_map=None or 'cpu', "
                             "blocks then move to the GPU one at a time) to quantize it")


@contextlib.contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """The block on `device` for the duration, back where it lives afterwards (on errors too).
    accelerate's AlignDevicesHooks inside it point at `device` meanwhile: a device_map may have put
    the block on another GPU, and its hook would move the inputs back there."""
    home = next(block.parameters()).device
    saved = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "execution_device", None) is not None:
                saved.append((h, h.execution_device))
                h.execution_device = device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)
        for h, dev in saved:
            h.execution_device = dev


__all__ = ["Placement", "check_materialized", "move_outside", "on_device", "restore"]
