"""The integer grid: group statistics, scale/zero choice, rounding, dequantization.

One definition used by tuning, RTN, export and our loader, so they can never disagree.
All grid arithmetic runs in float32 (scales are rounded to fp16 first, as checkpoints store them).

Worked example (asymmetric, 4 bits, one group `w = [-0.3, 0.0, 0.45]`, alpha = beta = 1):
wmin = -0.3, wmax = 0.45, scale = (0.45 + 0.3) / 15 = 0.05, zero = round(0.3 / 0.05) = 6;
codes = clamp(round(w / 0.05) + 6, 0, 15) = [0, 6, 15]; dequantized = 0.05 * (codes - 6)
= [-0.3, 0.0, 0.45].

Worked example (full-range symmetric, 4 bits, same group): maxq = 8, a = 0.3, b = 0.45; b >= a so
scale = -0.45 / 8 = -0.05625 (negative: the larger side maps onto code -8); codes are
clamp(round(w / scale), -8, 7) = [5, 0, -8], stored as codes + 8 = [13, 8, 0]; dequantized
= scale * [5, 0, -8] = [-0.28125, 0.0, 0.45].
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from signround.rounding.params import RoundingParams
from signround.rounding.spec import QuantSpec

SCALE_DTYPE = torch.float16
MIN_SCALE = 1e-5


def ste_round(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) forward; identity gradient backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def to_groups(weight: Tensor, group_size: int) -> Tensor:
    """[out, in] → [out, groups, group_size] in float32, zero-padding the last group if needed."""
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    pad = groups * group_size - in_features
    w = weight.float()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_features, groups, group_size)


def from_groups(grouped: Tensor, in_features: int) -> Tensor:
    """Inverse of `to_groups`: [out, groups, group_size] → [out, in] (padding dropped)."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


@attrs.frozen
class GroupedWeight:
    """A weight cut into groups plus its per-group range (computed once, reused every step)."""

    grouped: Tensor  # [out, groups, group_size], float32 (or the weight's bf16/fp16: same values)
    wmin: Tensor  # [out, groups], <= 0
    wmax: Tensor  # [out, groups], >= 0
    in_features: int
    dtype: torch.dtype


def group_weight(weight: Tensor, spec: QuantSpec) -> GroupedWeight:
    """Group `weight` [out, in] for `spec` and record each group's range, which always contains 0."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    gs = spec.effective_group_size(weight.shape[1])
    grouped = _to_groups_keep_dtype(weight, gs)
    wmin = grouped.amin(dim=-1).float().clamp(max=0.0)
    wmax = grouped.amax(dim=-1).float().clamp(min=0.0)
    return GroupedWeight(grouped, wmin, wmax, weight.shape[1], weight.dtype)


def _to_groups_keep_dtype(weight: Tensor, group_size: int) -> Tensor:
    """`to_groups` without the float32 upcast for bf16/fp16 weights (a view when no padding is
    needed): every use divides by a float32 scale first, which upcasts exactly."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return to_groups(weight, group_size)
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    pad = groups * group_size - in_features
    w = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    return w.reshape(out_features, groups, group_size)


def _clamp_unit(x: Tensor) -> Tensor:
    """Clamp to [0, 1] in value only: the gradient passes unchanged, also at the bounds.

    The reference clamps the parameter in place outside autograd; a clamp inside the graph would
    zero the gradient at exactly 1.0, where alpha/beta start, and they would never move.
    """
    return x + (x.clamp(0.0, 1.0) - x).detach()


def qparams(wmin: Tensor, wmax: Tensor, spec: QuantSpec, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero) from the range shrunk by alpha (min side) and beta (max side).

    Asymmetric: scale = (beta*wmax - alpha*wmin) / (2^bits - 1), zero = round(-alpha*wmin / scale).
    Symmetric (full range): a = -alpha*wmin, b = beta*wmax, scale = a / 2^(bits-1) if b < a else
    -b / 2^(bits-1); zero = 2^(bits-1). Scales are rounded to fp16 (as stored) and kept at
    |scale| >= 1e-5. Returned in float32; gradients flow to alpha/beta (zero via straight-through).
    """
    alpha = _clamp_unit(alpha)
    beta = _clamp_unit(beta)
    if spec.sym:
        half = float(2 ** (spec.bits - 1))
        a = -wmin * alpha
        b = wmax * beta
        scale = torch.where(b < a, a, -b) / half
        # Cast first, then floor in fp16 (as the reference does): the stored floor is fp16(1e-5).
        scale = scale.to(SCALE_DTYPE)
        scale = torch.where(scale < 0, scale.clamp(max=-MIN_SCALE), scale.clamp(min=MIN_SCALE)).float()
        zero = torch.full_like(scale, half)
    else:
        scale = ((wmax * beta - wmin * alpha) / spec.maxq).to(SCALE_DTYPE).clamp(min=MIN_SCALE).float()
        zero = ste_round(-wmin * alpha / scale)
    return scale, zero


def quantize_codes(grouped: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, v: Tensor | None = None) -> Tensor:
    """Integer codes in [0, 2^bits - 1] (float tensor, differentiable through the STE round).

    `grouped` [out, groups, gs], `scale`/`zero` [out, groups], `v` rounding offsets like `grouped`.
    """
    x = grouped / scale.unsqueeze(-1)
    if v is not None:
        x = x + v
    return (ste_round(x) + zero.unsqueeze(-1)).clamp(0, spec.maxq)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """scale * (codes - zero), per group; codes [out, groups, gs], scale/zero [out, groups]."""
    return scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))


def qdq_tensors(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                spec: QuantSpec, in_features: int, dtype: torch.dtype) -> Tensor:
    """`qdq_grouped` on plain tensors (what `torch.compile` sees): [out, in] in `dtype`.

    `grouped` may be kept in the weight's own dtype (bf16/fp16): dividing it by the float32 scale
    promotes to float32 exactly as an explicit upcast would, so the values are identical."""
    scale, zero = qparams(wmin, wmax, spec, alpha, beta)
    if v.shape != grouped.shape:
        v = to_groups(v, grouped.shape[-1])
    codes = quantize_codes(grouped, scale, zero, spec, v)
    return from_groups(dequantize_codes(codes, scale, zero), in_features).to(dtype)


def qdq_grouped(gw: GroupedWeight, spec: QuantSpec, params: RoundingParams) -> Tensor:
    """Quantize-dequantize a pre-grouped weight with rounding params; returns [out, in] in gw.dtype."""
    return qdq_tensors(gw.grouped, gw.wmin, gw.wmax, params.v, params.alpha, params.beta, spec,
                       gw.in_features, gw.dtype)


def qdq(weight: Tensor, spec: QuantSpec, params: RoundingParams | None = None) -> Tensor:
    """Fake-quantize `weight` [out, in] onto the grid of `spec` (RTN when `params` is None)."""
    if params is None:
        params = RoundingParams.zeros(weight.shape, spec, device=weight.device)
    return qdq_grouped(group_weight(weight, spec), spec, params)


@attrs.frozen
class QuantizedWeight:
    """Integer form of a weight: what a checkpoint stores.

    codes [out, in] int32 in [0, 2^bits-1]; scale [out, groups] fp16; zero [out, groups] int32.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.spec, dtype)


def dequantize_weight(codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """`QuantizedWeight.dequantize` on plain tensors (what torch.compile traces): fp32 s · (q − z), in `dtype`."""
    gs = spec.effective_group_size(codes.shape[1])
    w = dequantize_codes(to_groups(codes.float(), gs), scale.float(), zero.float())
    return from_groups(w, codes.shape[1]).to(dtype)


@torch.no_grad()
def quantize_weight(weight: Tensor, spec: QuantSpec, params: RoundingParams | None = None) -> QuantizedWeight:
    """Integer codes, fp16 scales and integer zeros of `weight` under `params` (RTN when None)."""
    gw = group_weight(weight, spec)
    if params is None:
        params = RoundingParams.zeros(weight.shape, spec, device=weight.device)
    scale, zero = qparams(gw.wmin, gw.wmax, spec, params.alpha, params.beta)
    v = params.v if params.v.shape == gw.grouped.shape else to_groups(params.v, gw.grouped.shape[-1])
    codes = quantize_codes(gw.grouped, scale, zero, spec, v)
    return QuantizedWeight(
        codes=from_groups(codes, gw.in_features).to(torch.int32),
        scale=scale.to(SCALE_DTYPE),
        zero=zero.to(torch.int32),
        spec=spec,
    )


@torch.no_grad()
def codes_from_dequantized(weight: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Recover integer codes from a weight that already lies on the grid: round(w / scale + zero)."""
    gs = spec.effective_group_size(weight.shape[1])
    grouped = to_groups(weight, gs)
    codes = torch.round(grouped / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)
    return from_groups(codes.clamp(0, spec.maxq), weight.shape[1]).to(torch.int32)
