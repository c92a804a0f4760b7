"""Which blocks of a Hugging Face model are tuned, and which Linear layers inside them are quantized.

Block lists are named by their dotted prefix ("model.layers", "model.language_model.layers"), as
`block_name_to_quantize` in an auto_round checkpoint. A registry keyed by `config.model_type` gives
the text-decoder (and vision) lists of known families; anything else goes through a generic finder
(the largest ModuleList of repeated blocks whose name does not look like a vision tower).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Optional, Union

import attrs
from torch import nn

from signround.adapters.checkpoint import rules
from signround.rounding import QuantSpec

VISION_MARKERS = ("vision", "visual", "image", "img")
PACK_MULTIPLE = 32  # packed checkpoints need in/out features divisible by 32

try:  # GPT-2 style layers keep their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]


@attrs.frozen
class FamilyBlocks:
    """Block-list prefixes of one model family: text decoder lists, then vision lists."""

    text: tuple[str, ...]
    vision: tuple[str, ...] = ()


_TEXT = FamilyBlocks(("model.layers",))
BLOCK_REGISTRY: dict[str, FamilyBlocks] = {
    "llama": _TEXT, "qwen2": _TEXT, "qwen3": _TEXT, "gemma3_text": _TEXT, "mistral": _TEXT, "phi3": _TEXT,
    "mixtral": _TEXT, "qwen2_moe": _TEXT, "qwen3_moe": _TEXT,  # fused experts: one Linear each (hf/experts.py)
    "qwen2_vl": FamilyBlocks(("model.language_model.layers",), ("model.visual.blocks",)),
    "qwen2_5_vl": FamilyBlocks(("model.language_model.layers",), ("model.visual.blocks",)),
    "llava": FamilyBlocks(("model.language_model.layers",), ("model.vision_tower.encoder.layers",)),
    "idefics3": FamilyBlocks(("model.text_model.layers",), ("model.vision_model.encoder.layers",)),
    "gemma3": FamilyBlocks(("model.language_model.layers",), ("model.vision_tower.encoder.layers",)),
    "mllama": FamilyBlocks(("model.language_model.layers",),
                           ("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers")),
}


def register_blocks(model_type: str, text: Iterable[str], vision: Iterable[str] = ()) -> None:
    """Teach discovery a new family: its text-decoder block lists and (optional) vision lists."""
    BLOCK_REGISTRY[model_type] = FamilyBlocks(tuple(text), tuple(vision))


def _module_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0}


def is_vision_name(name: str) -> bool:
    """A module name that looks like a vision tower's (vision, visual, image, img)."""
    low = name.lower()
    return any(marker in low for marker in VISION_MARKERS)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def generic_block_lists(model: nn.Module, quant_nontext_module: bool = False) -> list[str]:
    """Fallback discovery: ModuleLists of repeated blocks, text before vision, no nested lists.

    The text decoder is the largest non-vision list (by parameters); vision lists are added only
    with `quant_nontext_module`.
    """
    lists = {n: m for n, m in _module_lists(model).items()
             if len({type(b) for b in m}) <= 2 and any(is_quantizable(x) for x in m[0].modules())}
    top = [n for n in lists if not any(n != o and n.startswith(o + ".") for o in lists)]
    text = sorted((n for n in top if not is_vision_name(n)), key=lambda n: -_numel(lists[n]))
    found = text[:1]
    if quant_nontext_module:
        found = [n for n in top if is_vision_name(n)] + found
    return found


def find_block_lists(model: nn.Module, quant_nontext_module: bool = False) -> list[str]:
    """Prefixes of the block lists to quantize, in tuning order (vision lists first when included).

    Uses the registry for `model.config.model_type` when its prefixes exist in `model`, else the
    generic finder.
    """
    lists = _module_lists(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = BLOCK_REGISTRY.get(model_type or "")
    if family is not None and all(p in lists for p in family.text):
        vision = [p for p in family.vision if p in lists] if quant_nontext_module else []
        return vision + list(family.text)
    found = generic_block_lists(model, quant_nontext_module)
    if not found:
        raise ValueError(f"no block list (ModuleList of decoder layers) found in {type(model).__name__}; "
                         "pass block_names=[...] explicitly")
    return found


def blocks_of(model: nn.Module, prefix: str) -> nn.ModuleList:
    """The ModuleList at `prefix`, with a clear error when it is not one."""
    module = model.get_submodule(prefix)
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{prefix!r} is a {type(module).__name__}, not a ModuleList of blocks")
    return module


def is_quantizable(module: nn.Module) -> bool:
    """nn.Linear or transformers Conv1D."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    w = module.weight  # Conv1D: [in, out]
    return w.shape[1], w.shape[0]


LayerOverride = Union[QuantSpec, Mapping[str, Any]]


def _override_for(name: str, layer_config: Mapping[str, LayerOverride]) -> Optional[LayerOverride]:
    """layer_config's rule for `name` (`checkpoint.rules.match_rule`: exact name, else the first re.search)."""
    rule = rules.match_rule(layer_config, name)
    return None if rule is None else rule.override


def _apply_override(spec: QuantSpec, override: LayerOverride) -> Optional[QuantSpec]:
    """The layer's spec after an override; None means keep full precision (`checkpoint.rules`: bits > 8)."""
    return rules.apply_override(spec, override)


def _shape_problem(out_features: int, in_features: int, spec: QuantSpec) -> Optional[str]:
    if spec.group_size != -1 and spec.group_size < in_features and in_features % spec.group_size:
        return f"in_features {in_features} is not divisible by group_size {spec.group_size}"
    if in_features % PACK_MULTIPLE or out_features % PACK_MULTIPLE:
        return f"shape [{out_features}, {in_features}] is not divisible by {PACK_MULTIPLE} (packing)"
    return None


@attrs.frozen
class LayerPlan:
    """quantize: full layer name → its QuantSpec; skipped: full layer name → why it stays in full
    precision. other_weights: every other weight matrix of the model (parameter name → why it is not
    quantized): inside the blocks those of modules that are not Linear layers (MoE routers,
    convolutions, fused experts `hf/experts.py` does not unfuse), and everything outside the blocks
    (embeddings, lm_head, projectors). Unfused MoE experts are Linear layers like the others."""

    quantize: Mapping[str, QuantSpec]
    skipped: Mapping[str, str]
    other_weights: Mapping[str, str] = attrs.field(factory=dict)

    def fp_counts(self) -> dict[str, int]:
        """Weights kept in full precision: Linear layers skipped, other weights inside the blocks,
        weights outside the blocks."""
        inside = sum(1 for why in self.other_weights.values() if why != OUTSIDE)
        return {"layers": len(self.skipped), "other_in_blocks": inside, "outside_blocks": len(self.other_weights) - inside}


OUTSIDE = "outside the quantized blocks"


def _other_weights(model: nn.Module, block_prefixes: Iterable[str]) -> dict[str, str]:
    """Parameters of 2 or more dims that are not the weight of a quantizable layer in the blocks."""
    prefixes = tuple(block_prefixes)
    layer_weights = {f"{n}.weight" for n, m in model.named_modules() if is_quantizable(m)}
    owners = dict(model.named_modules())
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        inside = any(name.startswith(b + ".") for b in prefixes)
        if not inside:
            out[name] = OUTSIDE
        elif name not in layer_weights:
            owner = owners.get(name.rsplit(".", 1)[0])
            kind = type(owner).__name__ if owner is not None else "module"
            if "router" in kind.lower():  # vLLM builds the gate unquantized (GateLinear / ReplicatedLinear)
                out[name] = f"the MoE router ({kind}) {list(p.shape)}: kept in full precision"
                continue
            # fused experts reach here only in a layout hf/experts.py does not unfuse
            what = "fused MoE expert weights" if "expert" in name.lower() or "expert" in kind.lower() else \
                f"a {kind} weight"
            out[name] = f"{what} {list(p.shape)}: not a Linear layer, not quantized"
    return out


def select_layers(model: nn.Module, block_prefixes: Iterable[str], spec: QuantSpec,
                  layer_config: Optional[Mapping[str, LayerOverride]] = None) -> LayerPlan:
    """Every Linear/Conv1D inside the blocks, with `spec` or its layer_config override.

    layer_config keys are exact layer names or regular expressions (re.search); values are a
    QuantSpec or a mapping with any of bits/group_size/sym (bits 16 = keep in full precision).
    A layer narrower than group_size uses one group per row (group_size -1). Layers outside the
    blocks (lm_head, embeddings, projectors) are never touched.
    """
    layer_config = dict(layer_config or {})
    quantize: dict[str, QuantSpec] = {}
    skipped: dict[str, str] = {}
    for prefix in block_prefixes:
        for rel, module in blocks_of(model, prefix).named_modules():
            if not rel or not is_quantizable(module):
                continue
            name = f"{prefix}.{rel}"
            override = _override_for(name, layer_config)
            layer_spec = spec if override is None else _apply_override(spec, override)
            if layer_spec is None:
                skipped[name] = "layer_config: bits 16 (kept in full precision)"
                continue
            out_features, in_features = linear_shape(module)
            if layer_spec.group_size != -1 and in_features < layer_spec.group_size:
                layer_spec = attrs.evolve(layer_spec, group_size=-1)
            problem = _shape_problem(out_features, in_features, layer_spec)
            if problem:
                skipped[name] = problem
            else:
                quantize[name] = layer_spec
    return LayerPlan(quantize=quantize, skipped=skipped, other_weights=_other_weights(model, block_prefixes))


def _keeps_fp(value: Any) -> bool:
    if isinstance(value, QuantSpec):
        return False
    return isinstance(value, Mapping) and "bits" in value and rules.is_full_precision(value["bits"])


def check_layer_config_keys(model: nn.Module, block_prefixes: Iterable[str],
                            layer_config: Optional[Mapping[str, LayerOverride]]) -> None:
    """Every layer_config key must decide at least one layer inside the blocks (`rules.match_rule`:
    exact name, else the first key whose regex re.search-es it). A key that matches nothing is a
    ValueError listing near matches; one that matches only layers outside the blocks says so, unless
    it is the exact name of a Linear there (lm_head: rounded to nearest, `hf/outside.py`); one whose
    layers all go to earlier keys says which. Keys that keep layers in full precision (bits 16) may
    match layers outside the blocks."""
    if not layer_config:
        return
    prefixes = list(block_prefixes)
    inside = [f"{p}.{rel}" for p in prefixes for rel, m in blocks_of(model, p).named_modules()
              if rel and is_quantizable(m)]
    outside = [n for n, m in model.named_modules() if is_quantizable(m) and n not in set(inside)]
    chosen = {key: 0 for key in layer_config}
    for name in inside:
        rule = rules.match_rule(layer_config, name)
        if rule is not None:
            chosen[rule.key] += 1
    named_outside = {n for n in outside if isinstance(model.get_submodule(n), nn.Linear)}
    heads = [n for n in named_outside if n.rsplit(".", 1)[-1] == "lm_head"]
    for key, value in layer_config.items():
        if key in named_outside or _keeps_fp(value):
            continue
        try:
            caught = [n for n in heads if re.search(key.split(":", 1)[1] if key.startswith(
                (rules.INCLUDE, rules.EXCLUDE)) else key, n)]
        except re.error:
            caught = []
        if caught:
            raise ValueError(f"layer_config key {key!r} matches {caught[0]}, but a regular expression decides layers "
                             f"inside the blocks only; to quantize {caught[0]} name it exactly ({caught[0]!r})")
    for key, count in chosen.items():
        if count or key in named_outside:  # an exact outside Linear (lm_head): hf/outside.py quantizes it
            continue
        pattern = key.split(":", 1)[1] if key.startswith((rules.INCLUDE, rules.EXCLUDE)) else key

        def hits(names: list[str]) -> list[str]:
            found = [n for n in names if n == key]
            try:
                return found or [n for n in names if re.search(pattern, n)]
            except re.error:
                return found

        in_hits, out_hits = hits(inside), hits(outside)
        if in_hits:
            raise ValueError(f"layer_config key {key!r} matches {len(in_hits)} layer(s) ({in_hits[0]}, …), but every "
                             "one is decided by an earlier key (the first match wins); reorder or remove it")
        if out_hits:
            if _keeps_fp(layer_config[key]):
                continue  # those layers stay in full precision anyway
            raise ValueError(f"layer_config key {key!r} matches only layers outside the quantized blocks "
                             f"({', '.join(out_hits[:3])}{' …' if len(out_hits) > 3 else ''}); signround quantizes "
                             f"the layers inside {', '.join(prefixes)}, and one outside only when named "
                             f"exactly (e.g. {'lm_head'!r})" +
                             ("; the vision blocks need quant_nontext_module=True" if any(
                                 is_vision_name(n) for n in out_hits) else ""))
        short = sorted({n.split(".", len(n.split(".")) - 2)[-1] for n in inside} | {n.rsplit(".", 1)[-1] for n in inside})
        near = difflib.get_close_matches(key, short + inside, n=3, cutoff=0.5)
        raise ValueError(f"layer_config key {key!r} matches no layer of the model"
                         + (f"; near matches: {', '.join(near)}" if near else "")
                         + f" (layers look like {inside[0] if inside else '-'}; keys are exact names or regexes)")


def conv1d_layers(plan: LayerPlan, model: nn.Module) -> list[str]:
    """The layers of `plan` to quantize that are transformers Conv1D (GPT-2 style)."""
    if Conv1D is None:
        return []
    return [n for n in plan.quantize if isinstance(model.get_submodule(n), Conv1D)]
