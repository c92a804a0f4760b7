"""hf/experts.py: stacked 3D MoE experts become one nn.Linear per expert matrix, computing the same
thing, named as transformers' conversion mapping names the original per-expert tensors."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import never_route, tiny_moe
from torch import nn

from signround.adapters.hf.experts import (UnfusedExperts, count_routed, expert_leaf_names, experts_modules,
                                           not_routed_layers, unfuse_experts)

LEAVES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
          "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("model_type", sorted(LEAVES))
def test_unfused_experts_compute_what_the_stacked_ones_do(model_type: str) -> None:
    model = tiny_moe(model_type)
    stacked = model.model.layers[1].mlp.experts
    gate_up, down = stacked.gate_up_proj.detach().clone(), stacked.down_proj.detach().clone()
    ids = torch.randint(3, 240, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert unfuse_experts(model, ["model.layers"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert tuple(expert_leaf_names(model)) == LEAVES[model_type]
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, UnfusedExperts) and not any(p.dim() == 3 for p in model.parameters())
    g, u, d = experts.expert(2)
    inter = down.shape[-1]
    assert torch.equal(g.weight, gate_up[2, :inter]) and torch.equal(u.weight, gate_up[2, inter:])
    assert torch.equal(d.weight, down[2])
    assert f"model.layers.1.mlp.experts.2.{LEAVES[model_type][0]}.weight" in dict(model.named_parameters())
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert unfuse_experts(model) == []  # already unfused


def test_count_routed_names_the_experts_no_token_reached() -> None:
    model = tiny_moe("mixtral")
    never_route(model, layer=0, expert=3)
    unfuse_experts(model)
    with count_routed(model) as counts, torch.no_grad():
        model(input_ids=torch.randint(3, 240, (2, 16), generator=torch.Generator().manual_seed(1)))
    assert int(counts["model.layers.0.mlp.experts"][3]) == 0
    assert int(counts["model.layers.0.mlp.experts"].sum()) == 2 * 16 * 2  # every token, top-2
    assert not_routed_layers(counts, experts_modules(model)) == tuple(
        f"model.layers.0.mlp.experts.3.{leaf}" for leaf in ("w1", "w3", "w2"))


def test_a_layout_it_does_not_unfuse_is_left_alone() -> None:
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = True  # as gpt-oss stores them: [E, H, 2I]
    assert unfuse_experts(model) == ["model.layers.1.mlp.experts"]
    assert isinstance(model.model.layers[0].mlp.experts, nn.Module) and model.model.layers[0].mlp.experts is experts
