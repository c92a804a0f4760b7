"""Signed SGD with linear learning-rate decay, as a pair of pure functions (optax style).

    state = init(params)
    params, state = update(grads, params, state, loss)   # once per iteration

`params` is a mapping layer name → RoundingParams (a block's tunables). Each update moves every
element by exactly lr_t · sign(grad): v with `lr`, alpha/beta with `minmax_lr`, where
lr_t = lr · (1 − t / iters) (linear decay to 0, as the reference's LinearLR). alpha/beta are then
clamped to [0, 1]. When a loss is given, the params that produced it are kept if it is the best
so far — decided on the device with torch.where, so the loop never waits for the host.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
import torch
from torch import Tensor

from signround.rounding.params import RoundingParams

Params = Mapping[str, RoundingParams]


@attrs.frozen
class SignSGDConfig:
    """lr for v, minmax_lr for alpha/beta, iters for the decay horizon, tune_minmax to freeze alpha/beta."""

    lr: float
    minmax_lr: float
    iters: int
    tune_minmax: bool = True


@attrs.frozen
class SignSGDState:
    """step: iterations done; best_loss: lowest loss seen (device scalar); best: params that gave it."""

    config: SignSGDConfig
    step: int
    best_loss: Tensor
    best: Params


def init(params: Params, config: SignSGDConfig) -> SignSGDState:
    """Starting state: step 0, no best loss yet (inf), best params = the initial params."""
    device = next(iter(params.values())).v.device if params else None
    return SignSGDState(config=config, step=0, best_loss=torch.tensor(float("inf"), device=device),
                        best=dict(params))


def lr_at(config: SignSGDConfig, step: int) -> tuple[float, float]:
    """(lr, minmax_lr) used by iteration `step` (0-based): linear decay from full to 0 over iters."""
    factor = max(0.0, 1.0 - step / config.iters) if config.iters > 0 else 0.0
    return config.lr * factor, config.minmax_lr * factor


def _pick(better: Tensor, new: RoundingParams, old: RoundingParams) -> RoundingParams:
    return RoundingParams(*(torch.where(better, n, o) for n, o in zip(new.tensors(), old.tensors())))


def track_best(state: SignSGDState, params: Params, loss: Tensor) -> SignSGDState:
    """Remember `params` if `loss` (a device scalar) is lower than the best so far."""
    better = loss.detach() < state.best_loss
    best = {k: _pick(better, params[k], state.best[k]) for k in params}
    return attrs.evolve(state, best_loss=torch.where(better, loss.detach(), state.best_loss), best=best)


def apply_sign_step(params: RoundingParams, grads: RoundingParams, lr: float, minmax_lr: float,
                    tune_minmax: bool = True) -> RoundingParams:
    """One signed step on one layer: p − lr·sign(g); alpha/beta clamped to [0, 1] afterwards."""
    v = params.v - lr * torch.sign(grads.v)
    if not tune_minmax:
        return RoundingParams(v, params.alpha, params.beta)
    alpha = (params.alpha - minmax_lr * torch.sign(grads.alpha)).clamp(0.0, 1.0)
    beta = (params.beta - minmax_lr * torch.sign(grads.beta)).clamp(0.0, 1.0)
    return RoundingParams(v, alpha, beta)


def update(grads: Params, params: Params, state: SignSGDState,
           loss: Optional[Tensor] = None) -> tuple[dict[str, RoundingParams], SignSGDState]:
    """One iteration: track the best (if `loss` is given), then a signed step with this step's lr."""
    if loss is not None:
        state = track_best(state, params, loss)
    lr, minmax_lr = lr_at(state.config, state.step)
    cfg = state.config
    new = {k: apply_sign_step(params[k], grads[k], lr, minmax_lr, cfg.tune_minmax) for k in params}
    return new, attrs.evolve(state, step=state.step + 1)


def layer_step(p_v: Tensor, p_a: Tensor, p_b: Tensor, g_v: Tensor, g_a: Tensor, g_b: Tensor,
               b_v: Tensor, b_a: Tensor, b_b: Tensor, better: Tensor, lr: Tensor, minmax_lr: Tensor,
               tune_minmax: bool) -> tuple[Tensor, ...]:
    """`track_best` + `apply_sign_step` for one layer on plain tensors (lr as device scalars), so
    that `torch.compile` can fuse them into one pass: returns (v, alpha, beta, best_v, best_alpha,
    best_beta). Same values as `update` (lr·sign(g) is exactly ±lr, so fusing cannot round)."""
    nb = (torch.where(better, p_v, b_v), torch.where(better, p_a, b_a), torch.where(better, p_b, b_b))
    v = p_v - lr * torch.sign(g_v)
    if not tune_minmax:
        return (v, p_a, p_b, *nb)
    a = (p_a - minmax_lr * torch.sign(g_a)).clamp(0.0, 1.0)
    b = (p_b - minmax_lr * torch.sign(g_b)).clamp(0.0, 1.0)
    return (v, a, b, *nb)


def update_with(step_fn, lr_table: Tensor, grads: Params, params: Params, state: SignSGDState,
                loss: Tensor) -> tuple[dict[str, RoundingParams], SignSGDState]:
    """`update` through `step_fn` (`layer_step` or a compiled copy of it). lr_table [iters, 2] holds
    every step's (lr, minmax_lr) on the device, so no Python float reaches a compiled graph."""
    better = loss.detach() < state.best_loss
    lr, mlr = lr_table[state.step, 0], lr_table[state.step, 1]
    new, best = {}, {}
    for k in params:
        p, g, b = params[k], grads[k], state.best[k]
        out = step_fn(*p.tensors(), *g.tensors(), *b.tensors(), better, lr, mlr, state.config.tune_minmax)
        new[k], best[k] = RoundingParams(*out[:3]), RoundingParams(*out[3:])
    return new, attrs.evolve(state, step=state.step + 1, best=best,
                             best_loss=torch.where(better, loss.detach(), state.best_loss))


def lr_table(config: SignSGDConfig, device: torch.device | str | None = None) -> Tensor:
    """[iters, 2] float32: (lr, minmax_lr) of every step, as `lr_at` gives them."""
    rows = [lr_at(config, t) for t in range(max(config.iters, 1))]
    return torch.tensor(rows, dtype=torch.float32, device=device)
