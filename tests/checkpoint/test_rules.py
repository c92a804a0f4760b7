"""The one layer-rule matcher, the one full-precision rule, and the packing table."""

from __future__ import annotations

import pytest

from signround.adapters.checkpoint.config import CheckpointPlan
from signround.adapters.checkpoint.formats import (
    EXPORT_FORMATS,
    FORMAT_NAMES,
    PACKINGS,
    choose_packing,
    packing_of_config,
)
from signround.adapters.checkpoint.rules import apply_override, is_full_precision, match_rule
from signround.rounding import QuantSpec


def test_layer_spec_lookup() -> None:
    """(moved from test_loader: `loader.layer_spec` is now `CheckpointPlan.spec`)"""
    qc = {"bits": 4, "group_size": 128, "sym": True,
          "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 16}, r".*\.o_proj": {"bits": 8, "sym": False},
                           "lm_head": {"bits": 4, "group_size": 32, "sym": True, "data_type": "int"}}}
    plan = CheckpointPlan.of(qc)
    assert plan.spec("model.layers.0.mlp.down_proj") is None
    assert plan.spec("model.layers.3.self_attn.o_proj") == QuantSpec(8, 128, False)
    assert plan.spec("lm_head") == QuantSpec(4, 32, True)
    assert plan.spec("model.layers.3.mlp.up_proj") == QuantSpec(4, 128, True)
    gptq = {"bits": 4, "group_size": 128, "sym": True, "dynamic": {r"-:^model\.layers\.0\.mlp\.down_proj$": {},
                                                                    r"+:.*\.o_proj$": {"bits": 8}}}
    plan = CheckpointPlan.of(gptq)
    assert plan.spec("model.layers.0.mlp.down_proj") is None
    assert plan.spec("model.layers.2.self_attn.o_proj") == QuantSpec(8, 128, True)


def test_exact_name_wins_over_an_earlier_regex() -> None:
    rules = {r"mlp": {"bits": 8}, "model.layers.1.mlp.up_proj": {"bits": 2}}
    assert match_rule(rules, "model.layers.1.mlp.up_proj").value == {"bits": 2}
    assert match_rule(rules, "model.layers.2.mlp.up_proj").value == {"bits": 8}  # re.search, not fullmatch
    assert match_rule(rules, "model.layers.2.self_attn.q_proj") is None


def test_regexes_match_in_insertion_order() -> None:
    rules = {r"layers\.1\.": {"bits": 3}, r"up_proj": {"bits": 8}}
    assert match_rule(rules, "model.layers.1.mlp.up_proj").value == {"bits": 3}
    assert match_rule(dict(reversed(rules.items())), "model.layers.1.mlp.up_proj").value == {"bits": 8}


def test_module_and_checkpoint_names() -> None:
    rules = {"model.layers.0.mlp.up_proj": {"bits": 8}}  # a checkpoint name
    rule = match_rule(rules, "model.language_model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj")
    assert rule is not None and rule.key == "model.layers.0.mlp.up_proj"
    # an exact module name wins over an exact checkpoint name
    both = {"ckpt.q": {"bits": 3}, "module.q": {"bits": 5}}
    assert match_rule(both, "module.q", "ckpt.q").value == {"bits": 5}


def test_gptq_prefixes() -> None:
    rules = {r"-:^model\.layers\.0\.": {}, r"+:.*\.o_proj$": {"bits": 8}}
    excluded = match_rule(rules, "model.layers.0.self_attn.o_proj")
    assert excluded is not None and excluded.excluded and excluded.override == {"bits": 16}
    included = match_rule(rules, "model.layers.1.self_attn.o_proj")
    assert included is not None and not included.excluded and included.pattern == r".*\.o_proj$"


def test_invalid_regex_matches_exactly_only() -> None:
    rules = {"model.layers[0": {"bits": 8}}
    assert match_rule(rules, "model.layers[0").value == {"bits": 8}
    assert match_rule(rules, "model.layers.0.mlp") is None


@pytest.mark.parametrize(("bits", "kept"), [(8, False), (9, True), (16, True), (32, True), (2, False)])
def test_one_full_precision_rule(bits: int, kept: bool) -> None:
    assert is_full_precision(bits) is kept
    spec = QuantSpec(4, 128, True)
    assert (apply_override(spec, {"bits": bits}) is None) is kept  # layer_config (select_layers)
    assert (CheckpointPlan.of({**spec.to_dict(), "bits": bits}).spec("x") is None) is kept  # checkpoints


def test_apply_override() -> None:
    spec = QuantSpec(4, 128, True)
    assert apply_override(spec, {"group_size": 32}) == QuantSpec(4, 32, True)
    assert apply_override(spec, QuantSpec(8, -1, False)) == QuantSpec(8, -1, False)


def test_empty_extra_config_entry_defers_to_dynamic() -> None:
    qc = {"bits": 4, "extra_config": {"a.q": {}}, "dynamic": {r"-:^a\.q$": {}}}
    assert CheckpointPlan.of(qc).spec("a.q") is None


def test_packing_table() -> None:
    assert set(PACKINGS) == {"auto_round:auto_gptq", "auto_round", "auto_round:gptqmodel", "auto_gptq",
                             "auto_round:auto_awq"}
    assert FORMAT_NAMES == ("auto_round", "auto_gptq", "auto_round:auto_awq", "compressed_tensors", "gguf:q4_0",
                            "gguf:q4_1", "gguf:q5_0", "gguf:q5_1", "gguf:q8_0", "gguf:q2_k_s", "gguf:q3_k_s",
                            "gguf:q3_k_m", "gguf:q3_k_l", "gguf:q4_k_s", "gguf:q4_k_m", "gguf:q5_k_s",
                            "gguf:q5_k_m") == tuple(EXPORT_FORMATS)
    sym4, asym4, asym3 = QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, 32, False)
    assert choose_packing("auto_round", sym4, [sym4, QuantSpec(8, 32, True)]).name == "auto_round:auto_gptq"
    assert choose_packing("auto_round", asym4, [asym4]).name == "auto_round:auto_awq"
    assert choose_packing("auto_round", asym4, [asym4, QuantSpec(8, 32, False)]).name == "auto_round"
    assert choose_packing("auto_round:auto_awq", asym3, [asym3]).name == "auto_round:auto_awq"
    assert choose_packing("auto_round", asym3, [asym3]).name == "auto_round"
    assert choose_packing("auto_gptq", asym4, [asym4]).name == "auto_gptq"
    with pytest.raises(ValueError, match="unknown format 'fake'"):
        choose_packing("fake", sym4)


@pytest.mark.parametrize(("qc", "name"), [
    ({"quant_method": "gptq"}, "auto_gptq"),
    ({"quant_method": "gptq", "checkpoint_format": "gptq"}, "auto_gptq"),
    ({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, "auto_round:gptqmodel"),
    ({"quant_method": "auto-round"}, "auto_round:auto_gptq"),
    ({"quant_method": "intel/auto-round", "packing_format": "auto_round"}, "auto_round"),
    ({"quant_method": "auto-round", "packing_format": "auto_round:auto_awq"}, "auto_round:auto_awq"),
    ({"quant_method": "auto-round", "packing_format": "auto_round:gptqmodel"}, "auto_round:gptqmodel"),
    ({"quant_method": "auto-round", "packing_format": "auto_gptq"}, "auto_round:auto_gptq"),
])
def test_packing_of_config(qc: dict, name: str) -> None:
    assert packing_of_config(qc).name == name


def test_unknown_packings_refused() -> None:
    with pytest.raises(NotImplementedError, match="packing_format 'auto_round:marlin' is not supported"):
        packing_of_config({"quant_method": "auto-round", "packing_format": "auto_round:marlin"})
    with pytest.raises(NotImplementedError, match="quant_method 'awq' is not supported"):
        packing_of_config({"quant_method": "awq"})
