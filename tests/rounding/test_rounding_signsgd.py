"""Signed SGD: exact step sizes, schedule, clamps, donation (rounding/signsgd.py), and the compact
best iterate (rounding/best.py)."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from signround.rounding import QuantSpec, RoundingParams, best, group_weight, quantize_weight, sign_sgd

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def params_and_grads(draw):
    out, inp = draw(st.integers(1, 5)), draw(st.integers(1, 20))
    spec = QuantSpec(bits=4, group_size=draw(st.sampled_from([-1, 4])), sym=draw(st.booleans()))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    groups = spec.num_groups(inp)
    p = RoundingParams(torch.randn(out, inp, generator=gen) * 0.3,
                       torch.rand(out, groups, generator=gen),
                       torch.rand(out, groups, generator=gen))
    # Include exact zeros in the gradient: sign(0) = 0 means no move.
    g = RoundingParams(*(torch.randn(t.shape, generator=gen) * (torch.rand(t.shape, generator=gen) > 0.2)
                         for t in p.tensors()))
    return p, g


def _at_step(opt, params, step):
    state = opt.init(params)
    for _ in range(step):  # advance the schedule without moving params
        state = opt.advance(state)
    return state


@given(params_and_grads(), st.floats(1e-4, 0.1), st.floats(1e-4, 0.1), st.integers(1, 300), st.integers(0, 299))
@SETTINGS
def test_update_moves_each_element_by_lr_sign_grad_then_clamps(pg, lr, mlr, iters, step):
    p, g = pg
    step = step % iters
    opt = sign_sgd(lr, mlr, iters=iters)
    state = _at_step(opt, {"w": p}, step)
    before = p.map(torch.clone)
    new, new_state = opt.update({"w": g}, state, {"w": p})
    lr_t, mlr_t = opt.lr_at(step)
    assert torch.equal(new["w"].v, p.v - torch.sign(g.v) * torch.tensor(lr_t, dtype=torch.float32))
    for name in ("alpha", "beta"):
        b, grad, after = getattr(p, name), getattr(g, name), getattr(new["w"], name)
        assert torch.allclose(after, (b - mlr * (1 - step / iters) * torch.sign(grad)).clamp(0, 1), atol=1e-7)
        assert bool(((after >= 0) & (after <= 1)).all())
    assert int(new_state.step) == step + 1 and int(state.step) == step
    # Without donation no input is modified.
    assert all(torch.equal(x, y) for x, y in zip(before.tensors(), p.tensors()))


@given(params_and_grads(), st.floats(1e-4, 0.1), st.integers(1, 50))
@SETTINGS
def test_donated_update_gives_the_same_values_in_the_same_buffers(pg, lr, iters):
    p, g = pg
    opt = sign_sgd(lr, iters=iters)
    state = opt.init({"w": p})
    plain, _ = opt.update({"w": g}, state, {"w": p})
    donated_in = p.map(torch.clone)
    donated, _ = opt.update({"w": g}, state, {"w": donated_in}, donate=True)
    assert all(torch.equal(a, b) for a, b in zip(plain["w"].tensors(), donated["w"].tensors()))
    assert donated["w"].v.data_ptr() == donated_in.v.data_ptr()  # written in place


def test_lr_decays_linearly_to_zero():
    opt = sign_sgd(0.005, 0.01, iters=200)
    assert opt.lr_at(0) == (0.005, 0.01)
    assert opt.lr_at(100) == (0.0025, 0.005)
    assert opt.lr_at(200) == (0.0, 0.0)
    # Total movement available to v is lr·(iters+1)/2 ≈ 0.5: the implicit bound of the method.
    total = sum(opt.lr_at(t)[0] for t in range(200))
    assert abs(total - 0.005 * 201 / 2) < 1e-9
    state = opt.init({"w": RoundingParams.zeros((1, 4), QuantSpec(group_size=-1))})
    assert state.lrs.shape == (200, 2) and state.lrs.dtype == torch.float32  # the state is tensors only


def test_v_reaches_about_half_under_constant_sign():
    opt = sign_sgd(1 / 200, iters=200)
    p = {"w": RoundingParams(torch.zeros(1, 2), torch.ones(1, 1), torch.ones(1, 1))}
    g = {"w": RoundingParams(torch.tensor([[-1.0, 1.0]]), torch.ones(1, 1), -torch.ones(1, 1))}
    state = opt.init(p)
    for _ in range(200):
        p, state = opt.update(g, state, p)
    assert torch.allclose(p["w"].v, torch.tensor([[0.5025, -0.5025]]), atol=1e-5)
    assert float(p["w"].alpha) <= 0.5 + 1e-6 and float(p["w"].beta) == 1.0


def test_frozen_minmax_keeps_alpha_beta():
    opt = sign_sgd(0.1, iters=10, tune_minmax=False)
    p = {"w": RoundingParams(torch.zeros(1, 2), torch.full((1, 1), 0.7), torch.full((1, 1), 0.9))}
    g = {"w": RoundingParams(torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 1))}
    new, _ = opt.update(g, opt.init(p), p)
    assert new["w"].alpha is p["w"].alpha and new["w"].beta is p["w"].beta
    assert not torch.equal(new["w"].v, p["w"].v)


def test_best_codes_are_those_of_the_lowest_loss():
    spec = QuantSpec(bits=4, group_size=8)
    w = torch.randn(4, 16)
    gw = group_weight(w, spec)
    p = RoundingParams.zeros(w.shape, spec)
    state = best.init({"w": gw}, {"w": spec}, {"w": p})
    seen = []
    for i, loss in enumerate([5.0, 3.0, 4.0, 3.5, 3.0]):  # the tie at the end keeps the earlier one
        params = RoundingParams(torch.full_like(p.v, 0.1 * i) - 0.2, p.alpha * (1 - 0.05 * i), p.beta)
        seen.append(params)
        better = best.is_better(state, torch.tensor(loss))
        state = best.select(state, "w", better, best.codes_of(gw, spec, params), params)
        state = best.with_loss(state, better, torch.tensor(loss))
    assert float(state.loss) == 3.0
    got = best.to_quantized(state, {"w": gw}, {"w": spec})["w"]
    want = quantize_weight(w, spec, seen[1])
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    assert state.codes["w"].dtype == torch.uint8  # 1 byte per weight, not an fp32 copy of v


@given(st.integers(2, 8), st.booleans(), st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_compact_best_dequantizes_to_the_qdq_weight(bits, sym, seed):
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, group_size=8, sym=sym)
    w = torch.randn(3, 20, generator=gen)
    assume(bool((w != 0).any()))
    gw = group_weight(w, spec)
    p = RoundingParams(torch.rand(3, 20, generator=gen) - 0.5, torch.rand(3, 3, generator=gen),
                       torch.rand(3, 3, generator=gen))
    state = best.init({"w": gw}, {"w": spec}, {"w": p})
    from signround.rounding import qdq

    assert torch.equal(best.to_quantized(state, {"w": gw}, {"w": spec})["w"].dequantize(), qdq(w, spec, p))


def test_low_bit_long_runs_take_twice_the_default_lr():
    from signround.rounding import Recipe, preset

    best_recipe = preset("best")
    assert best_recipe.for_bits(2).resolved_lr == 2 / 1000 and best_recipe.for_bits(3).resolved_lr == 2 / 1000
    assert best_recipe.for_bits(4).resolved_lr == 1 / 1000
    assert preset("default").for_bits(2).resolved_lr == 1 / 200  # short runs keep 1/iters
    assert Recipe(iters=1000, lr=0.01).for_bits(2).resolved_lr == 0.01  # an explicit lr is kept
    # minmax_lr follows lr when it is not set, as everywhere else
    assert best_recipe.for_bits(2).resolved_minmax_lr == 2 / 1000
