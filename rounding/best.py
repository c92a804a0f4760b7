"""The best iterate, kept compactly: integer codes (uint8) and the range scales, not a copy of `v`.

The chosen weight of a layer is fully determined by its codes and its (scale, zero), and those by
alpha/beta: keeping them costs 1 byte per weight instead of the 4 of an fp32 copy of `v`, and gives
exactly the weight the iteration evaluated.

    best = init(prepared, specs, params)                       # iteration 0 (RTN) is the first candidate
    better = is_better(best, loss)                              # device bool, no host sync
    best = select(best, k, better, codes, params[k])           # per layer, for the params that gave `loss`
    best = with_loss(best, better, loss)
    quantized = to_quantized(best, prepared, specs)             # QuantizedWeight per layer
"""

from __future__ import annotations

from typing import Mapping

import attrs
import torch
from torch import Tensor

from signround.rounding.grid import (SCALE_DTYPE, GroupedWeight, QuantizedWeight, from_groups, qparams,
                                     quantize_codes, to_groups)
from signround.rounding.params import RoundingParams
from signround.rounding.recompute import CODE_DTYPE
from signround.rounding.spec import QuantSpec



@attrs.frozen
class BestState:
    """loss: lowest loss so far (0-d float32 tensor, inf at the start); per layer: codes [out, groups,
    group_size] uint8, alpha and beta [out, groups] float32 of the iterate that gave it."""

    loss: Tensor
    codes: Mapping[str, Tensor]
    alpha: Mapping[str, Tensor]
    beta: Mapping[str, Tensor]


def codes_of(gw: GroupedWeight, spec: QuantSpec, params: RoundingParams) -> Tensor:
    """Integer codes [out, groups, group_size] (float) of `params` on the grouped weight."""
    scale, zero = qparams(gw.wmin, gw.wmax, spec, params.alpha, params.beta)
    v = params.v if params.v.shape == gw.grouped.shape else to_groups(params.v, gw.grouped.shape[-1])
    return quantize_codes(gw.grouped, scale, zero, spec, v)


@torch.no_grad()
def init(prepared: Mapping[str, GroupedWeight], specs: Mapping[str, QuantSpec],
         params: Mapping[str, RoundingParams]) -> BestState:
    """The starting params as the first candidate, with no loss yet (inf)."""
    device = next(iter(params.values())).v.device if params else None
    return BestState(loss=torch.tensor(float("inf"), device=device),
                     codes={k: codes_of(prepared[k], specs[k], params[k]).to(CODE_DTYPE) for k in params},
                     alpha={k: params[k].alpha.clone() for k in params},
                     beta={k: params[k].beta.clone() for k in params})


def is_better(best: BestState, loss: Tensor) -> Tensor:
    """Strictly lower than every earlier loss (a device bool)."""
    return loss.detach() < best.loss


@torch.no_grad()
def select(best: BestState, key: str, better: Tensor, codes: Tensor, params: RoundingParams, *,
           donate: bool = False) -> BestState:
    """Keep layer `key`'s codes and alpha/beta when `better`. donate: write into `best`'s buffers."""
    c = codes.to(CODE_DTYPE)
    if donate:
        keep_if_better_(better, c, params.alpha, params.beta, best.codes[key], best.alpha[key], best.beta[key])
        return best
    return attrs.evolve(best, codes={**best.codes, key: torch.where(better, c, best.codes[key])},
                        alpha={**best.alpha, key: torch.where(better, params.alpha, best.alpha[key])},
                        beta={**best.beta, key: torch.where(better, params.beta, best.beta[key])})


def keep_if_better_(better: Tensor, codes: Tensor, alpha: Tensor, beta: Tensor, best_codes: Tensor,
                    best_alpha: Tensor, best_beta: Tensor) -> None:
    """`select`'s donated form on plain tensors: the best buffers take (codes, alpha, beta) where
    `better` (a device bool), in place."""
    torch.where(better, codes, best_codes, out=best_codes)
    torch.where(better, alpha, best_alpha, out=best_alpha)
    torch.where(better, beta, best_beta, out=best_beta)


def with_loss(best: BestState, better: Tensor, loss: Tensor) -> BestState:
    return attrs.evolve(best, loss=torch.where(better, loss.detach(), best.loss))


def clone(best: BestState) -> BestState:
    return BestState(loss=best.loss.clone(), codes={k: t.clone() for k, t in best.codes.items()},
                     alpha={k: t.clone() for k, t in best.alpha.items()},
                     beta={k: t.clone() for k, t in best.beta.items()})


@torch.no_grad()
def to_quantized(best: BestState, prepared: Mapping[str, GroupedWeight],
                 specs: Mapping[str, QuantSpec]) -> dict[str, QuantizedWeight]:
    """Every layer's QuantizedWeight (codes [out, in] int32, fp16 scales, int32 zeros) of the best iterate."""
    return {k: quantized_of(prepared[k], specs[k], codes, best.alpha[k], best.beta[k]) for k, codes in best.codes.items()}


@torch.no_grad()
def quantized_of(gw: GroupedWeight, spec: QuantSpec, codes: Tensor, alpha: Tensor, beta: Tensor) -> QuantizedWeight:
    """The QuantizedWeight of grouped `codes` with the grid of (alpha, beta)."""
    scale, zero = qparams(gw.wmin, gw.wmax, spec, alpha, beta)
    return QuantizedWeight(codes=from_groups(codes, gw.in_features).to(torch.int32), scale=scale.to(SCALE_DTYPE),
                           zero=zero.to(torch.int32), spec=spec)
