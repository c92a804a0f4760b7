"""Signed SGD with linear learning-rate decay, in optax's shape: built once, then `init`/`update`.

    opt = sign_sgd(lr=1 / 200, minmax_lr=1 / 200, iters=200)
    state = opt.init(params)
    params, state = opt.update(grads, state, params)       # once per iteration

`params` maps a layer name to its RoundingParams (a block's tunables). Each update moves every
element by exactly lr_t · sign(grad): v with `lr`, alpha/beta with `minmax_lr`, where
lr_t = lr · (1 − t / iters) (linear decay to 0, the reference's LinearLR); alpha/beta are then
clamped to [0, 1]. The hyper-parameters live on the optimizer value; the state holds only tensors
(the step count and the per-step learning rates, on the params' device), so a step never waits for
the host and the same function can be compiled.

Donation: `update(..., donate=True)` may write the new params into the buffers of `params` (as
JAX's donated arguments): the caller promises not to use the old value again. Without it, no input
is modified. Both give the same values.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
import torch
from torch import Tensor

from signround.rounding.params import RoundingParams

Params = Mapping[str, RoundingParams]


@attrs.frozen
class SignSGDState:
    """step: iterations done (int64 scalar tensor); lrs: [max(iters, 1), 2] float32 (lr, minmax_lr) per step."""

    step: Tensor
    lrs: Tensor


@attrs.frozen
class SignSGD:
    """The optimizer value: hyper-parameters fixed here; `init`/`update` are pure over tensor states."""

    lr: float
    minmax_lr: float
    iters: int
    tune_minmax: bool = True

    def lr_at(self, step: int) -> tuple[float, float]:
        """(lr, minmax_lr) used by iteration `step` (0-based): linear decay from full to 0 over iters."""
        factor = max(0.0, 1.0 - step / self.iters) if self.iters > 0 else 0.0
        return self.lr * factor, self.minmax_lr * factor

    def init(self, params: Params) -> SignSGDState:
        """Step 0 and every step's learning rates, on the device of `params`."""
        device = next(iter(params.values())).v.device if params else None
        rows = [self.lr_at(t) for t in range(max(self.iters, 1))]
        return SignSGDState(step=torch.zeros((), dtype=torch.int64, device=device),
                            lrs=torch.tensor(rows, dtype=torch.float32, device=device))

    def update_layer(self, grad: RoundingParams, state: SignSGDState, param: RoundingParams, *,
                     donate: bool = False) -> RoundingParams:
        """One layer's signed step at `state.step` (the step count is not advanced: see `advance`)."""
        lr, mlr = self.rates(state)
        if donate:
            signed_step_(param.v, param.alpha, param.beta, grad.v, grad.alpha, grad.beta, lr, mlr, self.tune_minmax)
            return param
        v = param.v - torch.sign(grad.v) * lr
        if not self.tune_minmax:
            return RoundingParams(v, param.alpha, param.beta)
        alpha = (param.alpha - torch.sign(grad.alpha) * mlr).clamp(0.0, 1.0)
        beta = (param.beta - torch.sign(grad.beta) * mlr).clamp(0.0, 1.0)
        return RoundingParams(v, alpha, beta)

    @staticmethod
    def rates(state: SignSGDState) -> tuple[Tensor, Tensor]:
        """(lr, minmax_lr) of the current step as 0-d device tensors."""
        # index_select, not lrs[step]: indexing with a 0-d tensor reads it on the host (a device sync
        # in every layer's update).
        lrs = state.lrs.index_select(0, state.step.reshape(1))
        return lrs[0, 0], lrs[0, 1]

    @staticmethod
    def advance(state: SignSGDState, *, donate: bool = False) -> SignSGDState:
        """The count after one more iteration; donate: in `state`'s own step buffer (a step replayed
        from a CUDA graph reads and advances the same buffer every time)."""
        if donate:
            state.step.add_(1)
            return state
        return attrs.evolve(state, step=state.step + 1)

    def update(self, grads: Params, state: SignSGDState, params: Params, *,
               donate: bool = False) -> tuple[dict[str, RoundingParams], SignSGDState]:
        """One iteration over every layer: signed step with this step's lr, then the count advances."""
        new = {k: self.update_layer(grads[k], state, params[k], donate=donate) for k in params}
        return new, self.advance(state, donate=donate)


def signed_step_(v: Tensor, alpha: Tensor, beta: Tensor, gv: Tensor, ga: Tensor, gb: Tensor, lr: Tensor, mlr: Tensor,
                 tune_minmax: bool) -> None:
    """The donated signed step on plain tensors, in place: v −= lr·sign(gv); with `tune_minmax`,
    alpha/beta −= mlr·sign(g), clamped to [0, 1]. (v + sign·(−lr) is v − sign·lr exactly: negation
    and ±lr products are exact.) Plain tensors and a bool, so a compiled caller guards on nothing else."""
    v.addcmul_(torch.sign(gv), lr.neg())
    if tune_minmax:
        alpha.addcmul_(torch.sign(ga), mlr.neg()).clamp_(0.0, 1.0)
        beta.addcmul_(torch.sign(gb), mlr.neg()).clamp_(0.0, 1.0)


def sign_sgd(lr: float, minmax_lr: Optional[float] = None, *, iters: int, tune_minmax: bool = True) -> SignSGD:
    """The SignRound optimizer (minmax_lr defaults to lr)."""
    return SignSGD(lr=float(lr), minmax_lr=float(lr if minmax_lr is None else minmax_lr), iters=int(iters),
                   tune_minmax=bool(tune_minmax))
