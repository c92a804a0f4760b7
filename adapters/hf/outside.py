"""Linear layers outside the quantized blocks that a layer_config quantizes (`lm_head`).

Only an exact module name selects a layer here (``{"lm_head": {"bits": 4}}``): regular expressions
keep matching inside the blocks only, so a rule written for the decoder never reaches a vision
projector or the output head by accident. Such layers are rounded to nearest (no calibration
passes through them inside a block); auto-round 0.16.1 quantizes `lm_head` from `layer_config` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from signround.adapters.checkpoint import rules
from signround.rounding import QuantSpec, quantize_weight
from signround.rounding.grid import QuantizedWeight


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _tied(model: nn.Module, module: nn.Module) -> bool:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return emb is not None and getattr(emb, "weight", None) is module.weight


def outside_layers(model: nn.Module, block_prefixes: Iterable[str], spec: QuantSpec,
                   layer_config: Mapping[str, Any]) -> dict[str, QuantSpec]:
    """Name → grid of every nn.Linear outside the blocks that `layer_config` names exactly with a
    quantizing grid. Refuses a layer that shares its weight with the input embeddings (tied
    `lm_head`: auto-round 0.16.1 declines it too) and shapes that cannot be packed."""
    prefixes = tuple(block_prefixes)
    found: dict[str, QuantSpec] = {}
    for name, value in layer_config.items():
        if _inside(name, prefixes):
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear):
            continue
        layer_spec = rules.apply_override(spec, value)
        if layer_spec is None:
            continue
        if _tied(model, module):
            raise ValueError(f"layer_config[{name!r}]: {name} shares its weight with the input embeddings "
                             "(tie_word_embeddings), so it cannot be quantized on its own; drop the entry")
        if module.in_features < layer_spec.group_size:
            layer_spec = QuantSpec(layer_spec.bits, -1, layer_spec.sym, layer_spec.data_type)
        if module.in_features % 32 or module.out_features % 32 or (
                layer_spec.group_size > 0 and module.in_features % layer_spec.group_size):
            raise ValueError(f"layer_config[{name!r}]: shape [{module.out_features}, {module.in_features}] cannot be "
                             f"packed with group_size {layer_spec.group_size} (multiples of 32 and of the group)")
        found[name] = layer_spec
    return found


@torch.no_grad()
def round_outside(model: nn.Module, specs: Mapping[str, QuantSpec]) -> dict[str, QuantizedWeight]:
    """Round each named layer's weight to its grid in place (RTN); returns the grids for export."""
    out: dict[str, QuantizedWeight] = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        qw = quantize_weight(module.weight, spec)
        module.weight.copy_(qw.dequantize(module.weight.dtype))
        out[name] = qw
    return out
