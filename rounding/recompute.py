"""The quantize-dequantize of a tuned layer as one autograd node that saves nothing of its own.

Autograd through `qdq_tensors` keeps several float32 [out, in] intermediates of every layer alive
from the forward to the backward. `QdqOps` instead computes the forward without a graph and, in
the backward, recomputes the qdq of that one layer under autograd and takes its vector-Jacobian
product: the same operations on the same values, so the gradients are the same bit for bit, while
only one layer's intermediates exist at a time. The two halves are plain functions, so a caller may
pass compiled versions of them (fused kernels; values equal up to float reassociation).

A backward may hand the layer's output gradient to a `sink` instead of returning gradients (the
fused step takes the vjp, the best-iterate select and the signed update there and then, so no
gradient of any layer is ever stored; `layer_step.py`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
import torch
from torch import Tensor

from signround.rounding.grid import GroupedWeight, dequantize_codes, from_groups, qdq_tensors, qparams, quantize_codes, to_groups
from signround.rounding.params import RoundingParams
from signround.rounding.spec import QuantSpec

CODE_DTYPE = torch.uint8  # integer codes of a layer, bits <= 8

# the output gradient of the layer's quantized weight -> None (the sink does the vjp and the update)
Sink = Callable[[Tensor], None]


def qdq_forward(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                spec: QuantSpec, in_features: int, dtype: torch.dtype) -> Tensor:
    """The quantized weight [out, in] in `dtype`, without a graph (`qdq_tensors`'s values)."""
    with torch.no_grad():
        return qdq_tensors(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype)


def qdq_vjp(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
            spec: QuantSpec, in_features: int, dtype: torch.dtype, grad: Tensor,
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(codes, dL/dv, dL/dalpha, dL/dbeta) for the output gradient `grad`: the qdq recomputed under
    autograd, exactly the graph `qdq_tensors` builds; codes [out, groups, gs] of these params."""
    with torch.enable_grad():
        v_, a_, b_ = (t.detach().requires_grad_(True) for t in (v, alpha, beta))
        scale, zero = qparams(wmin, wmax, spec, a_, b_)
        vg = v_ if v_.shape == grouped.shape else to_groups(v_, grouped.shape[-1])
        codes = quantize_codes(grouped, scale, zero, spec, vg)
        out = from_groups(dequantize_codes(codes, scale, zero), in_features).to(dtype)
        gv, ga, gb = torch.autograd.grad(out, (v_, a_, b_), grad, allow_unused=True)
    gv = torch.zeros_like(v) if gv is None else gv
    ga = torch.zeros_like(alpha) if ga is None else ga
    gb = torch.zeros_like(beta) if gb is None else gb
    return codes.detach().to(CODE_DTYPE), gv, ga, gb


def qdq_vjp_functional(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                       spec: QuantSpec, in_features: int, dtype: torch.dtype, grad: Tensor,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`qdq_vjp` written with torch.func.vjp, a form torch.compile can trace whole (one fused
    forward-and-backward kernel set); eager, it performs the same operations."""
    def qdq(v_: Tensor, a_: Tensor, b_: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero = qparams(wmin, wmax, spec, a_, b_)
        vg = v_ if v_.shape == grouped.shape else to_groups(v_, grouped.shape[-1])
        codes = quantize_codes(grouped, scale, zero, spec, vg)
        return from_groups(dequantize_codes(codes, scale, zero), in_features).to(dtype), codes

    _, pullback, codes = torch.func.vjp(qdq, v, alpha, beta, has_aux=True)
    gv, ga, gb = pullback(grad)
    return codes.detach().to(CODE_DTYPE), gv, ga, gb


@attrs.frozen
class QdqOps:
    """The two halves of a recomputing qdq: `forward` and `vjp` with the signatures above (eager by
    default; the engine may pass compiled ones), and optionally `step`, the whole in-backward step
    of one layer (`layer_step.layer_step`'s signature): None runs `vjp`, then the best-iterate select
    and the signed step as separate eager ops (the same values)."""

    forward: Callable[..., Tensor] = qdq_forward
    vjp: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] = qdq_vjp
    step: Optional[Callable[..., None]] = None


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, trigger: Tensor, grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor,
                beta: Tensor, meta: tuple) -> Tensor:
        ops, spec, in_features, dtype, sink = meta
        ctx.save_for_backward(grouped, wmin, wmax, v, alpha, beta)
        ctx.meta = meta
        return ops.forward(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        ops, spec, in_features, dtype, sink = ctx.meta
        if sink is not None:
            sink(grad)
            return (None,) * 8
        grouped, wmin, wmax, v, alpha, beta = ctx.saved_tensors
        codes, gv, ga, gb = ops.vjp(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype, grad)
        return None, None, None, None, gv, ga, gb, None


def recomputing_qdq(gw: GroupedWeight, spec: QuantSpec, params: RoundingParams, *, ops: QdqOps = QdqOps(),
                    trigger: Optional[Tensor] = None, sink: Optional[Sink] = None) -> Tensor:
    """The quantized weight of `params` as one autograd node. Gradients flow to params' tensors (when
    they require grad), or the output gradient goes to `sink(grad)` in the backward; `trigger` (a tensor that
    requires grad) makes autograd call the backward when the params themselves do not."""
    if trigger is None:
        trigger = torch.empty(0)
    return _Recompute.apply(trigger, gw.grouped, gw.wmin, gw.wmax, params.v, params.alpha, params.beta,
                            (ops, spec, gw.in_features, gw.dtype, sink))
