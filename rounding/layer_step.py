"""One layer's whole in-backward step as one function: qdq vjp, best-iterate select, signed step.

Inside the fused step (`tune._fused`) each layer's backward receives its quantized weight's output
gradient and must (1) take the vjp of its qdq at the params that gave this loss, (2) keep those
params' codes and alpha/beta as the best iterate when the loss is the lowest so far, (3) move the
params by one signed step. Run as separate eager ops, (2) and (3) read and write every weight's
state again (codes, the fp32 gradient, its sign, v) after the vjp wrote it. As one function, a
compiler can fuse them into the vjp's kernels: per weight it reads the weight, v and the gradient
and writes v and the best code once, and the fp32 gradient of v never exists in memory.

`layer_step` is written on plain tensors (and a bool), so a compiled version guards on nothing
that changes from block to block. It donates v, alpha, beta and the three best buffers; the values
are those of `recompute.qdq_vjp_functional` + `best.select(donate=True)` + `SignSGD.update_layer(
donate=True)` (the same operations in the same order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from signround.rounding.best import keep_if_better_
from signround.rounding.recompute import qdq_vjp_functional
from signround.rounding.signsgd import signed_step_
from signround.rounding.spec import QuantSpec


def layer_step(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, spec: QuantSpec,
               in_features: int, dtype: torch.dtype, grad: Tensor, better: Tensor, best_codes: Tensor,
               best_alpha: Tensor, best_beta: Tensor, lr: Tensor, mlr: Tensor, tune_minmax: bool) -> None:
    """In place: the best buffers take this iterate where `better`, then (v, alpha, beta) take one
    signed step against the vjp of the qdq for the output gradient `grad` (lr, mlr: 0-d tensors)."""
    codes, gv, ga, gb = qdq_vjp_functional(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype, grad)
    keep_if_better_(better, codes, alpha, beta, best_codes, best_alpha, best_beta)
    signed_step_(v, alpha, beta, gv, ga, gb, lr, mlr, tune_minmax)


__all__ = ["layer_step"]
