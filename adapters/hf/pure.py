"""A block as a pure function of its weights, and writing quantized weights back into the block.

`as_pure(block)` gives `fn(weights, inputs) -> Tensor` (torch.func.functional_call) and the weights
as a name → tensor mapping, which is what `signround.rounding.tune_block` drives. Conv1D weights
(stored [in, out]) appear transposed, as [out, in], so the core only ever sees [out, in] weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from signround.adapters.hf.blocks import Conv1D
from signround.adapters.hf.capture import CallLayout
from signround.adapters.hf.vision import PackedLayout
from signround.rounding import BlockInputs

PureBlock = Callable[[Mapping[str, Tensor], BlockInputs], Tensor]


def _transposed_names(block: nn.Module) -> frozenset[str]:
    if Conv1D is None:
        return frozenset()
    return frozenset(f"{n}.weight" if n else "weight" for n, m in block.named_modules() if isinstance(m, Conv1D))


def _first(output: Any) -> Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) and hasattr(output, "__getitem__"):
        output = output[0]
    return output


def call_block(block: nn.Module, params: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
    """`block(*args, **kwargs)` with `params` in place of its own tensors; the first output."""
    return _first(functional_call(block, params, args, kwargs, strict=False))


BlockCall = Callable[[nn.Module, Mapping[str, Tensor], tuple, dict], Tensor]


def as_pure(block: nn.Module, layout: Optional[Union[CallLayout, PackedLayout]] = None, *,
            autocast_dtype: Optional[torch.dtype] = None,
            call: BlockCall = call_block) -> tuple[PureBlock, dict[str, Tensor]]:
    """(fn, weights): `fn(weights, inputs)` runs `block` with `weights` on `inputs` and returns its
    output (the first element when the block returns a tuple).

    weights: every parameter and buffer of the block, detached (Conv1D weights as [out, in]).
    layout: how BlockInputs map onto the block's arguments and its output back onto rows (from
    capture); default: hidden states positionally plus `inputs.shared` and `inputs.per_sample` as
    keywords.
    autocast_dtype: run under torch.autocast with this dtype on the block's device (None = off).
    call: how the block is called (`call_block`, or a compiled version the engine's runtime gives).
    """
    transposed = _transposed_names(block)
    weights = {k: (v.detach().t() if k in transposed else v.detach())
               for k, v in {**dict(block.named_parameters()), **dict(block.named_buffers())}.items()}

    def fn(w: Mapping[str, Tensor], inputs: BlockInputs) -> Tensor:
        if layout is None:
            args, kwargs = (inputs.hidden,), {**inputs.shared, **inputs.per_sample}
        else:
            args, kwargs = layout.build(inputs)
        params = {k: (v.t() if k in transposed else v) for k, v in w.items()}
        ctx = (torch.autocast(inputs.hidden.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = call(block, params, args, kwargs)
        return out if layout is None else layout.finish(out, inputs)

    return fn, weights


def weight_name(layer: str) -> str:
    """The parameter name of a layer's weight inside its block ("self_attn.q_proj" → "self_attn.q_proj.weight")."""
    return f"{layer}.weight"


@torch.no_grad()
def write_back(block: nn.Module, qweights: Mapping[str, Tensor]) -> None:
    """Fix block weights to their quantized values, in place.

    qweights: weight name inside the block ("mlp.up_proj.weight") → quantized weight [out, in]
    (Conv1D weights are transposed back to their stored [in, out]). Nothing else is written onto
    the modules: each layer's grid travels in the engine's BlockResult / QuantReport.
    """
    transposed = _transposed_names(block)
    params = dict(block.named_parameters())
    for name, w in qweights.items():
        if name not in params:
            raise KeyError(f"block has no parameter {name!r}")
        target = params[name]
        target.copy_((w.t() if name in transposed else w).to(target.dtype))
