"""Tiny MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) built from configs, with stacked 3D experts as
transformers 5 builds them; and a router that never picks one expert (an expert without tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import VOCAB

MOE = {  # model_type -> config overrides: 4 experts, 2 per token, expert width 64
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
}


def tiny_moe(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, **MOE[model_type])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    for name, p in model.named_parameters():  # Qwen routers start at zero (every expert alike): make them route
        if name.endswith("mlp.gate.weight"):
            with torch.no_grad():
                p.normal_(0, 0.5)
    return model


def never_route(model: nn.Module, layer: int, expert: int) -> None:
    """Make the router of decoder layer `layer` never pick `expert` (its logit is -inf)."""
    gate = model.model.layers[layer].mlp.gate
    base = type(gate)

    class NeverRouter(base):  # type: ignore[misc,valid-type]
        def forward(self, hidden_states: torch.Tensor):  # noqa: ANN201 - the router's own signature
            weight = self.weight
            mask = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32)
            mask[expert] = float("-inf")
            hidden_states = hidden_states.reshape(-1, weight.shape[1])
            logits = nn.functional.linear(hidden_states, weight).float() + mask
            probs = torch.softmax(logits, dim=-1)
            top, idx = torch.topk(probs, self.top_k, dim=-1)
            top = (top / top.sum(dim=-1, keepdim=True)).to(hidden_states.dtype)
            return logits, top, idx

    gate.__class__ = NeverRouter


def tiny_qwen3_vl_moe(seed: int = 0) -> Any:
    """A Qwen3-VL-MoE (text decoder with stacked experts, a 2-block vision tower)."""
    from transformers import AutoModelForImageTextToText

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0])
    cfg = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, image_token_id=250,
                               video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg).eval()
