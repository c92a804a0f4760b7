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

A tensor that lived on the CPU goes back *into the tensor it came from* (copied in place), not into a
new one: a model loaded from safetensors holds views of the checkpoint's memory-mapped file, which
stays mapped while any of its tensors lives, so a fresh CPU copy would hold the weights twice.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

#: (module, key, is a parameter, the device it came from, the tensor it came from when that was on the CPU)
Placement = list[tuple[nn.Module, str, bool, torch.device, Optional[Tensor]]]


def _away(t: Tensor, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """(t on `device`, t itself when it is a CPU tensor to come back into)."""
    return t.to(device), (t if t.device.type == "cpu" else None)


def _back(now: Tensor, home: torch.device, original: Optional[Tensor]) -> Tensor:
    """`now` on `home`: written into `original` when it can hold it (same shape and dtype), else a copy."""
    if original is not None and original.shape == now.shape and original.dtype == now.dtype:
        original.copy_(now)
        return original
    return now.to(home)


def move_outside(model: nn.Module, prefixes: Iterable[str], device: torch.device) -> Placement:
    """Move every parameter and buffer that is not inside the block lists to `device`; returns
    where each one was, for `restore`."""
    skip = tuple(p + "." for p in prefixes)
    moved: Placement = []
    for name, module in model.named_modules():
        if name.startswith(skip) or any(name == p[:-1] for p in skip):
            continue
        _move(module, device, moved)
    return moved


def _move(module: nn.Module, device: torch.device, moved: Placement) -> None:
    """Move `module`'s own parameters and buffers that are not on `device` there, recording each in `moved`."""
    for key, p in list(module._parameters.items()):
        if p is not None and p.device != device:
            p.data, original = _away(p.data, device)
            moved.append((module, key, True, original.device if original is not None else p.device, original))
    for key, b in list(module._buffers.items()):
        if b is not None and b.device != device:
            home = b.device
            module._buffers[key], original = _away(b, device)
            moved.append((module, key, False, home, original))


def restore(moved: Placement) -> None:
    """Put back what `move_outside` (or `on_device`) moved, into the CPU tensors they came from."""
    for module, key, is_param, device, original in reversed(moved):  # last moved first: a tensor moved twice
        if is_param:
            p = module._parameters[key]
            if p is not None:
                p.data = _back(p.data, device, original)
        elif module._buffers.get(key) is not None:
            module._buffers[key] = _back(module._buffers[key], device, original)


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
    saved = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "execution_device", None) is not None:
                saved.append((h, h.execution_device))
                h.execution_device = device
    moved: Placement = []
    for module in block.modules():
        _move(module, device, moved)
    try:
        yield
    finally:
        restore(moved)
        for h, dev in saved:
            h.execution_device = dev


__all__ = ["Placement", "check_materialized", "move_outside", "on_device", "restore"]
