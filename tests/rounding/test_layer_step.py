"""The whole in-backward step of one layer as one function (rounding/layer_step.py): the same values
as the vjp, the best-iterate select and the signed step run one after another."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signround.rounding import QuantSpec, RoundingParams, best, group_weight, sign_sgd
from signround.rounding.layer_step import layer_step
from signround.rounding.recompute import qdq_vjp


@st.composite
def layers(draw):
    out, groups = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    gs = draw(st.sampled_from([4, 8]))
    inp = groups * gs - draw(st.integers(0, gs - 1))  # padded last group too
    spec = QuantSpec(bits=draw(st.sampled_from([2, 3, 4, 8])), group_size=gs, sym=draw(st.booleans()))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    w = torch.randn(out, inp, generator=gen).to(dtype)
    n = spec.num_groups(inp)
    p = RoundingParams((torch.rand(out, inp, generator=gen) - 0.5) * 0.8, 0.5 + 0.5 * torch.rand(out, n, generator=gen),
                       0.5 + 0.5 * torch.rand(out, n, generator=gen))
    grad = (torch.randn(out, inp, generator=gen) * (torch.rand(out, inp, generator=gen) > 0.2)).to(dtype)
    return w, spec, p, grad, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 9))


@given(layers())
@settings(max_examples=60, deadline=None)
def test_layer_step_equals_vjp_then_select_then_update(case):
    w, spec, p, grad, better_flag, tune_minmax, step = case
    gw = group_weight(w, spec)
    opt = sign_sgd(0.05, 0.02, iters=10, tune_minmax=tune_minmax)
    state = opt.init({"w": p})
    for _ in range(step):
        state = opt.advance(state)
    better = torch.tensor(better_flag)
    start = best.init({"w": gw}, {"w": spec}, {"w": p})

    # one after another (the engine's unfused path)
    ref_p, ref_best = p.map(torch.clone), best.clone(start)
    codes, gv, ga, gb = qdq_vjp(gw.grouped, gw.wmin, gw.wmax, ref_p.v, ref_p.alpha, ref_p.beta, spec, gw.in_features,
                                gw.dtype, grad)
    best.select(ref_best, "w", better, codes, ref_p, donate=True)
    opt.update_layer(RoundingParams(gv, ga, gb), state, ref_p, donate=True)

    # one function, in the same buffers
    new_p, new_best = p.map(torch.clone), best.clone(start)
    buffers = [t.data_ptr() for t in (*new_p.tensors(), new_best.codes["w"], new_best.alpha["w"], new_best.beta["w"])]
    lr, mlr = opt.rates(state)
    layer_step(gw.grouped, gw.wmin, gw.wmax, new_p.v, new_p.alpha, new_p.beta, spec, gw.in_features, gw.dtype, grad,
               better, new_best.codes["w"], new_best.alpha["w"], new_best.beta["w"], lr, mlr, tune_minmax)

    for a, b in zip(ref_p.tensors(), new_p.tensors()):
        assert torch.equal(a, b)
    for field in ("codes", "alpha", "beta"):
        assert torch.equal(getattr(ref_best, field)["w"], getattr(new_best, field)["w"])
    assert buffers == [t.data_ptr() for t in (*new_p.tensors(), new_best.codes["w"], new_best.alpha["w"],
                                                new_best.beta["w"])]
    # The step moved something (a test that cannot fail is no test): v by ±lr where the gradient is non-zero.
    moved = (new_p.v != p.v)
    assert torch.equal(moved, gv != 0)
    if better_flag:  # the best iterate holds the params that gave the loss: the ones before the step
        assert torch.equal(new_best.alpha["w"], p.alpha)
