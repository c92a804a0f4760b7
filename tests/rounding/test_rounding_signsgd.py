"""Signed SGD: exact step sizes, schedule, clamps and best-iterate tracking (rounding/signsgd.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signround.rounding import QuantSpec, RoundingParams, signsgd

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


@given(params_and_grads(), st.floats(1e-4, 0.1), st.floats(1e-4, 0.1), st.integers(1, 300), st.integers(0, 299))
@SETTINGS
def test_update_moves_each_element_by_lr_sign_grad_then_clamps(pg, lr, mlr, iters, step):
    p, g = pg
    step = step % iters
    cfg = signsgd.SignSGDConfig(lr=lr, minmax_lr=mlr, iters=iters)
    state = signsgd.init({"w": p}, cfg)
    for _ in range(step):  # advance the schedule without moving params
        state = signsgd.SignSGDState(cfg, state.step + 1, state.best_loss, state.best)
    new, new_state = signsgd.update({"w": g}, {"w": p}, state)
    factor = 1 - step / iters
    assert torch.allclose(new["w"].v, p.v - lr * factor * torch.sign(g.v), atol=1e-7)
    for name in ("alpha", "beta"):
        before, grad, after = getattr(p, name), getattr(g, name), getattr(new["w"], name)
        assert torch.allclose(after, (before - mlr * factor * torch.sign(grad)).clamp(0, 1), atol=1e-7)
        assert bool(((after >= 0) & (after <= 1)).all())
    assert new_state.step == step + 1
    # Inputs are not mutated.
    assert new["w"].v is not p.v


def test_lr_decays_linearly_to_zero():
    cfg = signsgd.SignSGDConfig(lr=0.005, minmax_lr=0.01, iters=200)
    assert signsgd.lr_at(cfg, 0) == (0.005, 0.01)
    assert signsgd.lr_at(cfg, 100) == (0.0025, 0.005)
    assert signsgd.lr_at(cfg, 200) == (0.0, 0.0)
    # Total movement available to v is lr·(iters+1)/2 ≈ 0.5: the implicit bound of the method.
    total = sum(signsgd.lr_at(cfg, t)[0] for t in range(200))
    assert abs(total - 0.005 * 201 / 2) < 1e-9


def test_v_reaches_about_half_under_constant_sign():
    cfg = signsgd.SignSGDConfig(lr=1 / 200, minmax_lr=1 / 200, iters=200)
    p = {"w": RoundingParams(torch.zeros(1, 2), torch.ones(1, 1), torch.ones(1, 1))}
    g = {"w": RoundingParams(torch.tensor([[-1.0, 1.0]]), torch.ones(1, 1), -torch.ones(1, 1))}
    state = signsgd.init(p, cfg)
    for _ in range(200):
        p, state = signsgd.update(g, p, state)
    assert torch.allclose(p["w"].v, torch.tensor([[0.5025, -0.5025]]), atol=1e-5)
    assert float(p["w"].alpha) <= 0.5 + 1e-6 and float(p["w"].beta) == 1.0


def test_frozen_minmax_keeps_alpha_beta():
    cfg = signsgd.SignSGDConfig(lr=0.1, minmax_lr=0.1, iters=10, tune_minmax=False)
    p = {"w": RoundingParams(torch.zeros(1, 2), torch.full((1, 1), 0.7), torch.full((1, 1), 0.9))}
    g = {"w": RoundingParams(torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 1))}
    new, _ = signsgd.update(g, p, signsgd.init(p, cfg))
    assert new["w"].alpha is p["w"].alpha and new["w"].beta is p["w"].beta


def test_best_params_are_those_that_produced_the_lowest_loss():
    cfg = signsgd.SignSGDConfig(lr=0.1, minmax_lr=0.1, iters=10)
    p = {"w": RoundingParams(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))}
    g = {"w": RoundingParams(-torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))}
    state = signsgd.init(p, cfg)
    seen = []
    for loss in [5.0, 3.0, 4.0, 3.5]:
        seen.append(p["w"].v.clone())
        p, state = signsgd.update(g, p, state, torch.tensor(loss))
    assert float(state.best_loss) == 3.0
    assert torch.equal(state.best["w"].v, seen[1])  # params before the step that saw loss 3.0
    # Ties keep the earlier params (strictly lower wins), like the reference.
    p2, state2 = signsgd.update(g, p, state, torch.tensor(3.0))
    assert torch.equal(state2.best["w"].v, seen[1])


def test_low_bit_long_runs_take_twice_the_default_lr():
    from signround.rounding import Recipe, preset

    best = preset("best")
    assert best.for_bits(2).resolved_lr == 2 / 1000 and best.for_bits(3).resolved_lr == 2 / 1000
    assert best.for_bits(4).resolved_lr == 1 / 1000
    assert preset("default").for_bits(2).resolved_lr == 1 / 200  # short runs keep 1/iters
    assert Recipe(iters=1000, lr=0.01).for_bits(2).resolved_lr == 0.01  # an explicit lr is kept
    # minmax_lr follows lr when it is not set, as everywhere else
    assert best.for_bits(2).resolved_minmax_lr == 2 / 1000
