"""Re-scoring the mixed-precision plan on its RTN-quantized model (spec/mixed-precision.md §4): the
scoring passes see the plan's rounded weights, each candidate's error is taken on the original
weight, the model comes back unchanged, and `choose` solves again on those scores within budget."""

from __future__ import annotations

import pytest
import torch
from scheme_helpers import score_by_hand
from tiny_models import random_batches, tiny_text_model

from signround.adapters.engine.scheme import score_layers
from signround.adapters.frontends import mixed
from signround.adapters.hf.blocks import find_block_lists, select_layers
from signround.rounding import QuantSpec, qdq

W2, W4, W8 = QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(8, 32)


def _direct(model, batches, name, spec, rounded):
    """The score by hand with x and ∂L/∂y taken on a copy whose `rounded` layers hold their RTN weights,
    W the original weight."""
    import copy

    q = copy.deepcopy(model)
    with torch.no_grad():
        for n, s in rounded.items():
            w = q.get_submodule(n).weight
            w.copy_(qdq(w, s))
    return score_by_hand(q, batches, name, spec, weight=model.get_submodule(name).weight)


def test_scores_on_the_rounded_model_use_its_inputs_and_gradients() -> None:
    model = tiny_text_model("llama")
    batches = random_batches(2, 2, 12)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    # every Linear of the blocks rounded to 2 bits: a heavily degraded model
    rounded = {n: W2 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = score_layers(model, batches, {n: (W2, W4, W8) for n in names})
    again = score_layers(model, batches, {n: (W2, W4, W8) for n in names}, quantized=rounded)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the rounded weights were put back
    assert all(p.requires_grad for p in model.parameters())
    for n in names:
        for spec, got in zip((W2, W4, W8), again.loss[n]):
            assert got == pytest.approx(_direct(model, batches, n, spec, rounded), rel=1e-4)
        # the degraded model's inputs and gradients move the scores
        assert again.loss[n] != pytest.approx(plain.loss[n], rel=1e-3)
        assert again.loss[n][0] > again.loss[n][1] > again.loss[n][2] > 0


def test_a_non_linear_to_round_is_refused() -> None:
    model = tiny_text_model("llama")
    with pytest.raises(ValueError, match="cannot round 'model.norm'"):
        score_layers(model, random_batches(1, 1, 8), {"model.layers.0.mlp.up_proj": (W4,)},
                     quantized={"model.norm": W4})


def _priced(model, target):
    request = mixed.MixedRequest.of(target, ["W2G32", "W4G32", "W8G32"], rescore=1)
    blocks = find_block_lists(model)
    priced = mixed.price(model, blocks, select_layers(model, blocks, request.candidates[0], {}), {}, {}, request,
                         "auto_round")
    return request, priced


def test_choose_rescores_on_the_first_plan_and_stays_in_budget() -> None:
    model = tiny_text_model("llama")
    batches = random_batches(2, 2, 16)
    request, priced = _priced(model, 3.5)
    first = mixed.choose(model, batches, priced, mixed.MixedRequest.of(3.5, request.candidates, rescore=0))
    plan = mixed.choose(model, batches, priced, request)
    assert len(first.rounds) == 1 and first.summary()["score"] == "fisher_weighted_rtn_output_error"
    assert [r["on"] for r in plan.rounds] == ["full precision", "plan rounded to nearest"]
    assert plan.summary()["score"] == "fisher_weighted_rtn_output_error+rescore1_on_plan_rtn"
    assert plan.summary()["rescore"] == 1 and plan.summary()["scoring_passes"] == 2
    assert plan.average_bits <= 3.5 and plan.exact
    # the final scores are those of the model with the first plan rounded to nearest
    per_layer = {n: {c: f[i] for c, f, _ in opts} for _, layers, opts in priced.groups for i, n in enumerate(layers)}
    expect = score_layers(model, batches, {n: tuple(m.values()) for n, m in per_layer.items()},
                          quantized=first.specs)
    for g in plan.groups:
        for cand, got in g.scores.items():
            want = sum(expect.loss[n][list(map(mixed.scheme_name, per_layer[n])).index(cand)] for n in g.layers)
            assert got == pytest.approx(want, rel=1e-9)
    # and they differ from the full-precision scores the first plan was solved on
    assert any(g.scores != pytest.approx(f.scores, rel=1e-3) for g, f in zip(plan.groups, first.groups))


@pytest.mark.parametrize("value", [-1, 1.5, True, mixed.MAX_RESCORE + 1])
def test_bad_rescore_is_refused(value) -> None:
    with pytest.raises(ValueError, match="rescore must be a whole number"):
        mixed.MixedRequest.of(3.0, rescore=value)


def test_facade_takes_rescore_and_records_it() -> None:
    from _templating_helpers import byte_tokenizer

    from signround.adapters.frontends.facade import AutoRound

    tok = byte_tokenizer([])
    small = dict(iters=2, nsamples=4, seqlen=16, batch_size=2, progress=False, candidates=["W2G32", "W4G32", "W8G32"])
    with pytest.raises(ValueError, match="pass target_bits"):
        AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, rescore=1)
    plan = AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, target_bits=4.0, rescore=0,
                     **small).mixed_plan()
    assert plan.summary()["rescore"] == 0 and len(plan.rounds) == 1
    plan = AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, target_bits=4.0, **small).mixed_plan()
    assert plan.rescore == mixed.DEFAULT_RESCORE and len(plan.rounds) >= 1 + min(1, mixed.DEFAULT_RESCORE)
    assert plan.average_bits <= 4.0


def test_cli_dry_run_with_rescore(tmp_path) -> None:
    from typer.testing import CliRunner
    from tiny_models import save_tiny_text_model

    from signround.cli import app

    model_dir = save_tiny_text_model(tmp_path / "tiny")
    res = CliRunner().invoke(app, ["quantize", str(model_dir), "--dry-run", "--group-size", "32", "--iters", "2",
                                   "--nsamples", "4", "--seqlen", "16", "--batch-size", "2", "--target-bits", "3.5",
                                   "--candidates", "W2G32,W4G32,W8G32", "--rescore", "1"])
    assert res.exit_code == 0, res.output
    assert "re-scored on the plan's RTN model" in res.output and "average:" in res.output
