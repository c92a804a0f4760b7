"""Property and worked-example tests of the integer grid (rounding/grid.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signround.rounding import (
    QuantSpec,
    RoundingParams,
    group_weight,
    qdq,
    qparams,
    quantize_weight,
)
from signround.rounding.grid import codes_from_dequantized, dequantize_codes, quantize_codes, to_groups

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def weights_and_specs(draw):
    bits = draw(st.integers(2, 8))
    sym = draw(st.booleans())
    group_size = draw(st.sampled_from([-1, 4, 8, 16, 32]))
    out = draw(st.integers(1, 6))
    in_features = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, in_features, generator=gen) * scale).to(dtype)
    return w, QuantSpec(bits=bits, group_size=group_size, sym=sym)


@given(weights_and_specs())
@SETTINGS
def test_codes_stay_in_range(ws):
    w, spec = ws
    q = quantize_weight(w, spec)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= spec.maxq
    assert q.scale.dtype == torch.float16
    assert q.scale.shape == (w.shape[0], spec.num_groups(w.shape[1]))


@given(weights_and_specs())
@SETTINGS
def test_rtn_error_at_most_half_a_step(ws):
    w, spec = ws
    q = quantize_weight(w, spec)
    gs = spec.effective_group_size(w.shape[1])
    err = (w.float() - q.dequantize()).abs()
    step = q.scale.float().abs().repeat_interleave(gs, dim=1)[:, : w.shape[1]]
    # Half a step from rounding, plus what the fp16 rounding of the scale costs at the far end of
    # the grid: 2^bits codes times half an fp16 ulp (2^-11 relative, or 2^-25 for subnormals).
    ulp_err = torch.maximum(step * 2.0**-11, torch.full_like(step, 2.0**-25))
    slack = 0.5 * step + 2**spec.bits * ulp_err + 1e-7
    if spec.sym:
        # Full-range sym maps the larger side onto -2^(b-1); the other side only reaches
        # 2^(b-1) - 1, so values there beyond the last code are clamped: error up to one step.
        zero = q.zero.float().repeat_interleave(gs, dim=1)[:, : w.shape[1]]
        raw = torch.round(w.float() / q.scale.float().repeat_interleave(gs, dim=1)[:, : w.shape[1]]) + zero
        clamped = raw > spec.maxq
        assert bool((err[clamped] <= 2 * slack[clamped]).all())
        err, slack = err[~clamped], slack[~clamped]
    assert bool((err <= slack).all()), float((err - slack).max())


@given(weights_and_specs())
@SETTINGS
def test_codes_are_fixed_points_of_dequantize_quantize(ws):
    w, spec = ws
    q = quantize_weight(w, spec)
    deq = q.dequantize(torch.float32)
    again = codes_from_dequantized(deq, q.scale, q.zero, spec)
    assert torch.equal(again, q.codes)


@given(weights_and_specs())
@SETTINGS
def test_qdq_equals_dequantized_codes(ws):
    w, spec = ws
    q = quantize_weight(w, spec)
    assert torch.equal(qdq(w, spec).float(), q.dequantize().to(w.dtype).float())


@given(weights_and_specs(), st.integers(0, 5))
@SETTINGS
def test_groups_are_independent(ws, which):
    w, spec = ws
    gs = spec.effective_group_size(w.shape[1])
    groups = spec.num_groups(w.shape[1])
    g = which % groups
    changed = w.clone()
    lo, hi = g * gs, min((g + 1) * gs, w.shape[1])
    changed[:, lo:hi] = changed[:, lo:hi] * 3 + 1
    a, b = qdq(w, spec), qdq(changed, spec)
    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[lo:hi] = False
    assert torch.equal(a[:, keep], b[:, keep])


@given(weights_and_specs(), st.sampled_from([0.5, 2.0, 4.0, 0.25]))
@SETTINGS
def test_power_of_two_scaling_commutes_with_qdq(ws, factor):
    # Multiplying a group by a power of two scales its range, scale and qdq output by exactly that
    # factor (the fp16 rounding of the scale commutes with it), as long as nothing hits the 1e-5
    # floor or leaves the fp16 range.
    w, spec = ws
    w = w.float()
    q = quantize_weight(w, spec)
    assume_ok = bool((q.scale.float().abs() * min(factor, 1.0) > 1e-4).all()) and bool(
        (q.scale.float().abs() * factor < 6e4).all())
    if not assume_ok:
        return
    assert torch.equal(qdq(w * factor, spec), qdq(w, spec) * factor)


def test_worked_example_asym():
    # Hand computation: wmin=-0.3, wmax=0.45 → scale 0.75/15 = 0.05 (fp16: 0.04998779296875),
    # zero = round(0.3/0.05) = 6, codes = round(w/scale) + 6 = [0, 6, 15].
    w = torch.tensor([[-0.3, 0.0, 0.45]])
    q = quantize_weight(w, QuantSpec(bits=4, group_size=-1, sym=False))
    assert q.codes.tolist() == [[0, 6, 15]]
    assert q.zero.tolist() == [[6]]
    assert q.scale.item() == 0.04998779296875
    assert torch.allclose(q.dequantize(), torch.tensor([[-0.29993, 0.0, 0.44989]]), atol=1e-5)


def test_worked_example_sym_full_range():
    # a = 0.3, b = 0.45 >= a → scale = -0.45/8 = -0.05625; fp16 steps by 2^-15 there, so it is
    # stored as -1843·2^-15 = -0.056243896484375; zero 8,
    # q = clamp(round(w/scale), -8, 7) = [round(5.333), 0, -8] = [5, 0, -8] → codes [13, 8, 0].
    w = torch.tensor([[-0.3, 0.0, 0.45]])
    q = quantize_weight(w, QuantSpec(bits=4, group_size=-1, sym=True))
    assert q.codes.tolist() == [[13, 8, 0]]
    assert q.zero.tolist() == [[8]]
    assert q.scale.item() == -1843 * 2.0**-15
    assert torch.allclose(q.dequantize(), torch.tensor([[-0.28122, 0.0, 0.44995]]), atol=1e-5)


def test_worked_example_sym_negative_side_dominates():
    # a = 0.8 > b = 0.2 → positive scale 0.8/8 = 0.1 (fp16 0.0999755859375); w = -0.8 → -8 → code 0,
    # w = 0.2 → 2 → code 10, w = 0.06 → round(0.6) = 1 → code 9.
    w = torch.tensor([[-0.8, 0.2, 0.06]])
    q = quantize_weight(w, QuantSpec(bits=4, group_size=-1, sym=True))
    assert q.codes.tolist() == [[0, 10, 9]]
    assert q.scale.item() == 0.0999755859375


def test_worked_example_groups_and_padding():
    # 2 groups of 2; the last group is padded with a zero (in_features 3): [1, 3] and [-2, (0)].
    w = torch.tensor([[1.0, 3.0, -2.0]])
    q = quantize_weight(w, QuantSpec(bits=2, group_size=2, sym=False))
    # group 0: wmin 0, wmax 3 → scale 1, zero 0 → codes [1, 3]
    # group 1: wmin -2, wmax 0 → scale 2/3 (fp16 0.66650390625), zero round(2/0.6665) = 3 → code 0
    assert q.codes.tolist() == [[1, 3, 0]]
    assert q.zero.tolist() == [[0, 3]]


def test_all_zero_group_uses_scale_floor():
    w = torch.zeros(2, 8)
    for sym in (True, False):
        q = quantize_weight(w, QuantSpec(bits=4, group_size=4, sym=sym))
        assert torch.equal(q.dequantize(), w)
        assert bool((q.scale.float().abs() >= 1e-5 * 0.99).all())


def test_alpha_beta_clamped_to_unit_interval():
    w = torch.randn(4, 16)
    spec = QuantSpec(bits=4, group_size=8, sym=False)
    gw = group_weight(w, spec)
    big = torch.full_like(gw.wmin, 3.0)
    one = torch.ones_like(gw.wmin)
    assert torch.equal(qparams(gw.wmin, gw.wmax, spec, big, big)[0], qparams(gw.wmin, gw.wmax, spec, one, one)[0])


# --- straight-through gradients, against the derivative written out in spec/rounding.md -------


def _grad(w, spec, v, alpha, beta, upstream=None):
    v, alpha, beta = (t.clone().requires_grad_(True) for t in (v, alpha, beta))
    out = qdq(w, spec, RoundingParams(v, alpha, beta))
    if upstream is None:
        upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * upstream).sum().backward()
    return upstream, v.grad, alpha.grad, beta.grad


@given(weights_and_specs())
@SETTINGS
def test_ste_gradient_wrt_v_is_scale_inside_range(ws):
    # dŵ/dv = scale where the code is strictly inside the grid, 0 where it is clamped
    # (spec/rounding.md, Gradients). Codes exactly on the grid's ends are left out: there the STE
    # sum x + (round(x) - x) can land a hair outside and the clamp may or may not pass the gradient.
    w, spec = ws
    w = w.float()
    p = RoundingParams.zeros(w.shape, spec)
    upstream, gv, _, _ = _grad(w, spec, p.v, p.alpha, p.beta)
    gw = group_weight(w, spec)
    gs = gw.grouped.shape[-1]
    scale, zero = qparams(gw.wmin, gw.wmax, spec, p.alpha, p.beta)
    raw = torch.round(gw.grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    flat = lambda t: t.reshape(w.shape[0], -1)[:, : w.shape[1]]  # noqa: E731
    raw = flat(raw)
    step = flat(scale.unsqueeze(-1).expand_as(gw.grouped))
    inside = (raw > 0) & (raw < spec.maxq)
    outside = (raw < 0) | (raw > spec.maxq)
    assert torch.allclose(gv[inside], (upstream * step)[inside], rtol=1e-6, atol=0)
    assert bool((gv[outside] == 0).all())


def test_ste_gradient_wrt_alpha_beta_asym_by_hand():
    # One asym group, w = [-1, 0.5, 2], 2 bits (maxq 3), alpha = 1, beta = 0.9; look at w = 0.5 only.
    # s = (0.9·2 + 1)/3 = 0.9333… → fp16 0.93310546875; zp = round(1/s) = 1.
    # r = 0.5/s = 0.53584…, code = round(r) + zp = 2 (inside the grid), ŵ = s·(round(r) + zp − zp).
    # The zero point enters twice and cancels, so dŵ/ds = round(r) + s·(−w/s²) = round(r) − r
    # = 1 − 0.53584 = 0.46416. ds/dbeta = wmax/3 = 2/3, ds/dalpha = −wmin/3 = 1/3
    # (the fp16 cast passes gradients through, rounded to fp16).
    w = torch.tensor([[-1.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2, group_size=-1, sym=False)
    upstream = torch.tensor([[0.0, 1.0, 0.0]])
    _, gv, ga, gb = _grad(w, spec, torch.zeros(1, 3), torch.ones(1, 1), torch.full((1, 1), 0.9), upstream)
    dw_ds = 1 - 0.5 / 0.93310546875
    assert math.isclose(float(gb), dw_ds * 2 / 3, rel_tol=2e-3)
    assert math.isclose(float(ga), dw_ds * 1 / 3, rel_tol=2e-3)
    assert math.isclose(float(gv[0, 1]), 0.93310546875, rel_tol=1e-6)


def test_ste_gradient_sym_by_hand():
    # Sym 4 bits, w = [-0.8, 0.2, 0.06]: a = 0.8·alpha > b = 0.2·beta → s = a/8 = 0.1·alpha, no beta
    # dependence. At alpha = 1: s = fp16(0.1) = 0.0999755859375. For w = 0.2: r = 2.0005 → code 2
    # (inside), ŵ = s·round(r) → dŵ/ds = round(r) − r; ds/dalpha = 0.8/8 = 0.1; d/dbeta = 0.
    w = torch.tensor([[-0.8, 0.2, 0.06]])
    spec = QuantSpec(bits=4, group_size=-1, sym=True)
    upstream = torch.tensor([[0.0, 1.0, 0.0]])
    _, _, ga, gb = _grad(w, spec, torch.zeros(1, 3), torch.ones(1, 1), torch.ones(1, 1), upstream)
    s = 0.0999755859375
    assert math.isclose(float(ga), (2 - 0.2 / s) * 0.1, rel_tol=2e-3, abs_tol=1e-7)
    assert float(gb) == 0.0


def test_dequantize_codes_matches_formula():
    codes = torch.tensor([[[0.0, 5.0, 15.0]]])
    scale = torch.tensor([[0.5]])
    zero = torch.tensor([[5.0]])
    assert dequantize_codes(codes, scale, zero).tolist() == [[[-2.5, 0.0, 5.0]]]
    assert quantize_codes(torch.tensor([[[-2.5, 0.0, 5.0]]]), scale, zero, QuantSpec(4, -1, False)).tolist() == [[[0.0, 5.0, 15.0]]]


@pytest.mark.parametrize("bad", [
    dict(bits=1), dict(bits=9), dict(bits=4.0), dict(group_size=0), dict(group_size=-2),
    dict(data_type="fp8"), dict(sym="yes"),
])
def test_bad_specs_fail_at_construction(bad):
    with pytest.raises((ValueError, TypeError)) as err:
        QuantSpec(**bad)
    key = next(iter(bad))
    assert key in str(err.value) or key == "sym"
