"""Fused MoE experts as one nn.Linear per expert matrix, so they are tuned and exported like any layer.

transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE (and the
families whose conversion mapping aliases them) as two stacked 3D parameters on one module:
``gate_up_proj`` [E, 2I, H] (gate rows then up rows) and ``down_proj`` [E, H, I], each slice
already [out, in]. `unfuse_experts` swaps such a module for `UnfusedExperts`, whose children are
``{e}.{gate}``, ``{e}.{up}``, ``{e}.{down}`` nn.Linear layers holding those slices, with the same forward as the eager experts loop. The block tuning, the layer plan, export
and the loader then see E·3 ordinary Linears, named as the original checkpoints name them:
``experts.{e}.w1/w3/w2`` for Mixtral, ``experts.{e}.gate_proj/up_proj/down_proj`` for the Qwen
MoEs — read from transformers' own checkpoint conversion mapping (`expert_leaf_names`), which
merges exactly those per-expert tensors into the 3D parameters on load. vLLM's FusedMoE loaders
map the same names (spec/format.md, "MoE experts").

Experts that the calibration data never routes a token to get no gradient: sign-SGD does not move
their rounding, so they keep their round-to-nearest weights (auto-round behaves the same way);
`count_routed` lets the engine report them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import attrs
import torch
from torch import Tensor, nn

#: leaf names when transformers keeps no per-expert conversion for the family (its checkpoints
#: store the 3D tensors): the Qwen/Llama names auto-round and vLLM's generic MoE mapping use
DEFAULT_LEAVES = ("gate_proj", "up_proj", "down_proj")


@attrs.frozen
class ExpertLeaves:
    """Checkpoint leaf names of one expert's matrices: gate (w1), up (w3), down (w2)."""

    gate: str
    up: str
    down: str

    def __iter__(self) -> Iterator[str]:
        return iter((self.gate, self.up, self.down))


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module this adapter unfuses: 3D ``gate_up_proj`` [E, 2I, H]
    (gate then up, concatenated) and ``down_proj`` [E, H, I], no biases, not transposed."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        return False
    if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        return False
    e, two_i, h = gate_up.shape
    return down.shape == (e, h, two_i // 2) and two_i % 2 == 0


def unsupported_layout(module: nn.Module) -> Optional[str]:
    """Why a module holding 3D expert weights is not unfused (None when it is, or holds none)."""
    if is_stacked_experts(module):
        return None
    params = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not params:
        return None
    flags = {k: getattr(module, k) for k in ("is_transposed", "is_concatenated", "has_bias", "has_gate")
             if hasattr(module, k)}
    return f"stacked experts {params} in a layout signround does not unfuse ({flags or 'no gate_up_proj/down_proj'})"


_EXPERT_SOURCE = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")


def expert_leaf_names(model: nn.Module) -> ExpertLeaves:
    """The per-expert names transformers' conversion mapping merges into ``gate_up_proj`` (gate,
    up: the two sources of its Concatenate) and ``down_proj``; `DEFAULT_LEAVES` when the mapping
    has none (the family's checkpoints are stored stacked)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers < 5 has no stacked experts
        return ExpertLeaves(*DEFAULT_LEAVES)
    gate_up: list[str] = []
    down: list[str] = []
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        targets = [str(t) for t in conv.target_patterns]
        leaves = [m.group(1) for s in conv.source_patterns if (m := _EXPERT_SOURCE.search(str(s)))]
        if len(targets) == 1 and targets[0].endswith("experts.gate_up_proj") and len(leaves) == 2:
            gate_up = leaves
        elif len(targets) == 1 and targets[0].endswith("experts.down_proj") and len(leaves) == 1:
            down = leaves
    if gate_up and down:
        return ExpertLeaves(gate_up[0], gate_up[1], down[0])
    return ExpertLeaves(*DEFAULT_LEAVES)


class _Expert(nn.Module):
    """One expert's three Linear layers (attributes named by `ExpertLeaves`)."""


class UnfusedExperts(nn.Module):
    """The routed experts as ``{e}.{gate|up|down}`` nn.Linear children; forward(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) → [T, H], the eager loop of transformers' experts
    (an index equal to num_experts, the expert-parallel sentinel, is skipped as there)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, leaves: ExpertLeaves, act_fn: Any,
                 *, dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.leaves = leaves
        self.act_fn = act_fn
        kw = {"dtype": dtype, "device": device, "bias": False}
        for e in range(num_experts):
            expert = _Expert()
            expert.add_module(leaves.gate, nn.Linear(hidden, intermediate, **kw))
            expert.add_module(leaves.up, nn.Linear(hidden, intermediate, **kw))
            expert.add_module(leaves.down, nn.Linear(intermediate, hidden, **kw))
            self.add_module(str(e), expert)

    def expert(self, e: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down) layers of expert `e` (Linear, or QuantLinear once packed)."""
        m = self._modules[str(e)]
        return getattr(m, self.leaves.gate), getattr(m, self.leaves.up), getattr(m, self.leaves.down)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            gate, up, down = self.expert(e)
            y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"leaves={tuple(self.leaves)}")


def unfused_from(module: nn.Module, leaves: ExpertLeaves) -> UnfusedExperts:
    """An `UnfusedExperts` holding a copy of each slice of `module`'s 3D parameters (meta stays
    meta). Copies, not views: the 3D tensors are freed once the module is swapped, and checkpoint
    writers refuse tensors that share storage."""
    gate_up, down = module.gate_up_proj, module.down_proj
    e, two_i, h = gate_up.shape
    i = two_i // 2
    out = UnfusedExperts(e, h, i, leaves, module.act_fn, dtype=gate_up.dtype, device="meta")
    for k in range(e):
        g, u, d = out.expert(k)
        g.weight = nn.Parameter(gate_up.data[k, :i].clone(), requires_grad=gate_up.requires_grad)
        u.weight = nn.Parameter(gate_up.data[k, i:].clone(), requires_grad=gate_up.requires_grad)
        d.weight = nn.Parameter(down.data[k].clone(), requires_grad=down.requires_grad)
    return out


def unfuse_experts(model: nn.Module, prefixes: Optional[Sequence[str]] = None) -> list[str]:
    """Swap every stacked experts module (under `prefixes`, default anywhere) for `UnfusedExperts`,
    in place; returns their names. Already unfused modules are left as they are, so calling it
    twice is harmless. The forward is the same computation, expert by expert."""
    found = [(n, m) for n, m in model.named_modules() if is_stacked_experts(m)
             and (prefixes is None or any(n.startswith(p + ".") for p in prefixes))]
    if not found:
        return []
    leaves = expert_leaf_names(model)
    for name, module in found:
        model.set_submodule(name, unfused_from(module, leaves))
    return [n for n, _ in found]


def experts_modules(model: nn.Module) -> dict[str, UnfusedExperts]:
    """name → every `UnfusedExperts` in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def expert_of(layer: str, experts: Mapping[str, UnfusedExperts]) -> Optional[tuple[str, int]]:
    """(experts module name, expert index) when `layer` ("….experts.3.w1") is an expert's matrix."""
    parent, _, _leaf = layer.rpartition(".")
    owner, _, index = parent.rpartition(".")
    return (owner, int(index)) if owner in experts and index.isdigit() else None


@contextlib.contextmanager
def count_routed(module: nn.Module, prefix: str = "") -> Iterator[dict[str, Tensor]]:
    """Count the tokens routed to each expert while the body runs: yields {experts module name
    (with `prefix`) → int64 [num_experts]}, filled by forward pre-hooks (every position the
    router saw, padding included)."""
    counts: dict[str, Tensor] = {}
    handles = []
    for name, m in module.named_modules():
        if not isinstance(m, UnfusedExperts):
            continue
        key = f"{prefix}.{name}" if prefix and name else (prefix or name)

        def hook(mod: UnfusedExperts, args: tuple, kwargs: dict, key: str = key) -> None:
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if idx is None:
                return
            hits = torch.bincount(idx.reshape(-1).long().cpu(), minlength=mod.num_experts + 1)[: mod.num_experts]
            counts[key] = counts.get(key, torch.zeros_like(hits)) + hits

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def not_routed_layers(counts: Mapping[str, Tensor], experts: Mapping[str, UnfusedExperts]) -> tuple[str, ...]:
    """The layer names ("….experts.3.w1", …) of every expert that `counts` saw no token for
    (counts keys and `experts` keys are full module names)."""
    out = []
    for name, module in experts.items():
        seen = counts.get(name)
        for e in range(module.num_experts):
            if seen is None or int(seen[e]) == 0:
                out.extend(f"{name}.{e}.{leaf}" for leaf in module.leaves)
    return tuple(out)
