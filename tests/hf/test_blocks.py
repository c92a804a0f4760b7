"""Block discovery (registry + generic fallback) and layer selection on tiny models of each family."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import TEXT_FAMILIES, VLM_FAMILIES, tiny_text_model, tiny_vlm

from signround.adapters.hf.blocks import (BLOCK_REGISTRY, find_block_lists, generic_block_lists, register_blocks,
                                       select_layers)
from signround.rounding import QuantSpec

TEXT_PREFIX = {"qwen2_vl": "model.language_model.layers", "qwen2_5_vl": "model.language_model.layers",
               "llava": "model.language_model.layers", "idefics3": "model.text_model.layers",
               "gemma3": "model.language_model.layers", "mllama": "model.language_model.layers"}
VISION_PREFIXES = {"qwen2_vl": ["model.visual.blocks"], "qwen2_5_vl": ["model.visual.blocks"],
                   "llava": ["model.vision_tower.encoder.layers"], "idefics3": ["model.vision_model.encoder.layers"],
                   "gemma3": ["model.vision_tower.encoder.layers"],
                   "mllama": ["model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"]}


@pytest.mark.parametrize("model_type", TEXT_FAMILIES)
def test_text_families_find_the_decoder_layers(model_type: str) -> None:
    model = tiny_text_model(model_type)
    assert find_block_lists(model) == ["model.layers"]
    assert generic_block_lists(model) == ["model.layers"]


@pytest.mark.parametrize("model_type", VLM_FAMILIES)
def test_vlms_find_the_text_decoder_and_skip_vision_by_default(model_type: str) -> None:
    model = tiny_vlm(model_type)
    assert find_block_lists(model) == [TEXT_PREFIX[model_type]]
    assert find_block_lists(model, quant_nontext_module=True) == VISION_PREFIXES[model_type] + [TEXT_PREFIX[model_type]]
    # the generic fallback agrees on the text decoder and finds vision lists only when asked
    assert generic_block_lists(model) == [TEXT_PREFIX[model_type]]
    with_vision = generic_block_lists(model, quant_nontext_module=True)
    assert with_vision[-1] == TEXT_PREFIX[model_type] and len(with_vision) >= 2


def test_unknown_model_type_uses_the_generic_finder(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vlm("qwen2_vl")
    monkeypatch.setattr(model.config, "model_type", "brand_new_vlm")
    assert find_block_lists(model) == ["model.language_model.layers"]


def test_registry_entry_that_does_not_match_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BLOCK_REGISTRY, "llama", BLOCK_REGISTRY["qwen2_vl"])
    assert find_block_lists(tiny_text_model("llama")) == ["model.layers"]


def test_register_blocks_adds_a_family(monkeypatch: pytest.MonkeyPatch) -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "toy"})()
            self.small = nn.ModuleList([nn.Sequential(nn.Linear(32, 32)) for _ in range(2)])
            self.big = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)) for _ in range(2)])

    monkeypatch.setattr("signround.adapters.hf.blocks.BLOCK_REGISTRY", dict(BLOCK_REGISTRY))
    assert find_block_lists(Toy()) == ["big"]  # generic: the largest list
    register_blocks("toy", ["small"])
    assert find_block_lists(Toy()) == ["small"]


def test_layer_selection_rules_and_overrides() -> None:
    model = tiny_text_model("llama", intermediate_size=96)  # down_proj in=96: not divisible by 64
    spec = QuantSpec(bits=4, group_size=64)
    plan = select_layers(model, ["model.layers"], spec, {r"layers\.1\.self_attn\.o_proj": {"bits": 16},
                                                         "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": 32}})
    assert "model.layers.0.mlp.down_proj" in plan.skipped and "divisible" in plan.skipped["model.layers.0.mlp.down_proj"]
    assert plan.skipped["model.layers.1.self_attn.o_proj"].startswith("layer_config")
    assert plan.quantize["model.layers.0.self_attn.q_proj"] == QuantSpec(bits=8, group_size=32)
    assert plan.quantize["model.layers.0.mlp.up_proj"] == spec
    assert not any("lm_head" in n or "embed" in n for n in [*plan.quantize, *plan.skipped])
    assert len(plan.quantize) + len(plan.skipped) == 2 * 7


def test_narrow_layers_use_one_group_per_row_and_odd_shapes_are_skipped() -> None:
    model = tiny_text_model("llama", hidden_size=64, intermediate_size=128)
    plan = select_layers(model, ["model.layers"], QuantSpec(group_size=128))
    assert plan.quantize["model.layers.0.self_attn.q_proj"].group_size == -1  # in 64 < 128
    assert plan.quantize["model.layers.0.mlp.down_proj"].group_size == 128
    odd = tiny_text_model("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    plan = select_layers(odd, ["model.layers"], QuantSpec(group_size=16))
    assert "packing" in plan.skipped["model.layers.0.self_attn.q_proj"]


def test_conv1d_layers_are_selected() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    prefixes = find_block_lists(model)
    assert prefixes == ["transformer.h"]
    plan = select_layers(model, prefixes, QuantSpec(group_size=32))
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= set(plan.quantize)
