"""target_bits end to end on a tiny model: the plan meets the budget as inspect counts it, fused
groups share a grid, the plan is a layer_config that reproduces itself, and bad requests fail
before any work."""

from __future__ import annotations

import json

import pytest
from _templating_helpers import byte_tokenizer
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.inspect import inspect_checkpoint
from signround.adapters.checkpoint.targets import fused_groups
from signround.adapters.frontends.facade import AutoRound
from signround.rounding.budget import BudgetError

SMALL = dict(iters=2, nsamples=4, seqlen=16, batch_size=2, progress=False)
CANDIDATES = ["W2G32", "W4G32", "W8G32"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer([])


def _model(tok):
    return tiny_text_model("llama", vocab_size=len(tok))


def test_plan_meets_the_budget_as_inspect_counts_it(tok, tmp_path) -> None:
    ar = AutoRound(_model(tok), tok, target_bits=4.0, candidates=CANDIDATES, **SMALL)
    plan = ar.mixed_plan()
    assert plan is not None and plan.exact
    assert plan.average_bits <= 4.0
    assert len({g.spec for g in plan.groups}) > 1  # a real mix: W4G32 alone is 4.625 bits here
    chosen = plan.specs
    for _, members in fused_groups(chosen):
        assert len({chosen[n] for n in members}) == 1, members
    ar.quantize()
    assert {n: r.spec for n, r in ar.report.layers.items()} == chosen
    out = ar.save_quantized(tmp_path / "ckpt", inplace=False)
    info = inspect_checkpoint(out)
    assert info["average_bits"] == pytest.approx(plan.average_bits, rel=1e-12)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["signround_settings"]["mixed_precision"]["average_bits"] == pytest.approx(plan.average_bits)
    top = (qc["bits"], qc["group_size"], qc["sym"])
    for name, spec in chosen.items():  # extra_config holds every layer off the top-level grid
        if (spec.bits, spec.group_size, spec.sym) != top:
            assert qc["extra_config"][name]["bits"] == spec.bits, name


def test_plan_file_round_trips(tok, tmp_path) -> None:
    ar = AutoRound(_model(tok), tok, target_bits=3.5, candidates=CANDIDATES, **SMALL)
    plan = ar.mixed_plan()
    path = tmp_path / "plan.json"
    path.write_bytes(plan.to_json())
    from signround.adapters.frontends.arguments import read_layer_config

    again = AutoRound(_model(tok), tok, layer_config=read_layer_config(path), **SMALL)
    assert dict(again.plan().quantize) == plan.specs


def test_no_fuse_groups_lets_members_differ(tok) -> None:
    """Without fusing, each layer is its own choice; the search is at least as good."""
    fused = AutoRound(_model(tok), tok, target_bits=3.5, candidates=CANDIDATES, **SMALL).mixed_plan()
    free = AutoRound(_model(tok), tok, target_bits=3.5, candidates=CANDIDATES, fuse_groups=False,
                     **SMALL).mixed_plan()
    assert len(free.groups) > len(fused.groups)
    assert all(len(g.layers) == 1 for g in free.groups)
    score = lambda p: sum(g.scores[f"W{g.spec.bits}G{g.spec.group_size}"] for g in p.groups)  # noqa: E731
    assert score(free) <= score(fused) * (1 + 1e-9)


def test_layer_config_fixes_layers_and_counts_them(tok) -> None:
    pinned = "model.layers.0.mlp.down_proj"
    ar = AutoRound(_model(tok), tok, target_bits=4.0, candidates=CANDIDATES, **SMALL,
                   layer_config={pinned: {"bits": 8, "group_size": 32}})
    plan = ar.mixed_plan()
    fixed = [g for g in plan.groups if g.fixed]
    assert [g.name for g in fixed] == [pinned] and fixed[0].spec.bits == 8
    assert plan.average_bits <= 4.0


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(target_bits=1.0), "minimum achievable is 2.5625 bits per weight"),  # W2G32: 2 + (16 + 2) / 32
    (dict(target_bits="3"), "target_bits must be a number"),
    (dict(target_bits=3.0, candidates=["W3"]), "not a scheme"),
    (dict(target_bits=3.0, candidates=["W4G48"]), "takes none of the candidates"),
    (dict(candidates=["W4G32"]), "pass target_bits"),
    (dict(target_bits=3.0, candidates=["W8G32asym"]), "8-bit asymmetric"),
    (dict(target_bits=3.0, fuse_groups=False, target="vllm"), "vLLM cannot load"),
])
def test_bad_requests_fail_in_the_constructor(tok, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        AutoRound(_model(tok), tok, **{**SMALL, "candidates": CANDIDATES, **kwargs})
    if "minimum" in match:
        assert isinstance(err.value, BudgetError)


def test_torchrun_is_refused_with_the_two_step_recipe(tok, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--plan-out plan.json"):
        AutoRound(_model(tok), tok, target_bits=3.0, candidates=CANDIDATES, **SMALL)


def test_mllm_on_image_text_calibration() -> None:
    """AutoRoundMLLM takes the same arguments; the scores run the VLM's forward on image-text batches."""
    from vlm_helpers import qwen2_vl_with_processor

    from signround.adapters.frontends.facade import AutoRoundMLLM

    model, tok, proc = qwen2_vl_with_processor()
    ar = AutoRoundMLLM(model, tok, processor=proc, dataset="embedded", target_bits=4.0, candidates=CANDIDATES,
                       **{**SMALL, "seqlen": 256})
    plan = ar.mixed_plan()
    assert plan.average_bits <= 4.0 and plan.score_tokens > 0
    assert all(n.startswith("model.language_model.layers.") for n in plan.specs)
    assert {n: r.spec for n, r in ar.quantize().layers.items()} == plan.specs
