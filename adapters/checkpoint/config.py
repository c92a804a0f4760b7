"""`quantization_config`: the one build/parse pair (field by field: spec/format.md).

`build_quantization_config` is what export writes; `parse_quantization_config` gives back the
packing and a `CheckpointPlan` that tells each layer's grid (or full precision) from the top-level
`bits`/`group_size`/`sym`, auto-round's `extra_config` and GPTQModel's `dynamic`. The loader and
`signround inspect` read checkpoints through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs

from signround.adapters.checkpoint.formats import (
    AUTO_ROUND_METHOD,
    COMPRESSED_METHOD,
    EXPORT_FORMATS,
    Packing,
    get_format,
    packing_of_config,
)
from signround.adapters.checkpoint.rules import EXCLUDE, FULL_PRECISION_BITS, INCLUDE, Rule, grid, match_rule
from signround.rounding.recipe import Recipe
from signround.rounding.spec import QuantSpec

#: the auto-round release whose checkpoint layout we reproduce (written as `autoround_version`)
AUTOROUND_COMPAT_VERSION = "0.16.1"
#: what a checkpoint's grid is read from; `data_type` is not: packed codes are integers whatever it says
_READ_KEYS = {"bits": int, "group_size": int, "sym": bool}


def signround_version() -> str:
    try:
        return metadata.version("signround")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def in_blocks(name: str, prefixes: Sequence[str]) -> bool:
    """Whether layer `name` lies under one of the block-list `prefixes`."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "data_type": spec.data_type}


def _recipe_fields(recipe: Recipe | None) -> dict[str, Any]:
    """iters always; the other tuning knobs only when they differ from the defaults (informational)."""
    if recipe is None:
        return {}
    default = Recipe()
    out: dict[str, Any] = {"iters": recipe.iters}
    if recipe.lr is not None and recipe.iters and abs(recipe.lr - 1.0 / recipe.iters) > 1e-12:
        out["lr"] = recipe.lr
    if recipe.minmax_lr is not None and abs(recipe.resolved_minmax_lr - recipe.resolved_lr) > 1e-12:
        out["minmax_lr"] = recipe.minmax_lr
    for key in ("nsamples", "seqlen", "batch_size", "gradient_accumulate_steps", "enable_minmax_tuning",
                "enable_quanted_input"):
        if getattr(recipe, key) != getattr(default, key):
            out[key] = getattr(recipe, key)
    if recipe.iters == 0:
        out["enable_quanted_input"] = False  # nothing is fed forward without tuning (as 0.16.1 writes)
    return out


def _anchored(name: str) -> str:
    return f"^{re.escape(name)}$"


def build_quantization_config(
    fmt: str,
    spec: QuantSpec,
    layer_specs: Mapping[str, QuantSpec],
    fp_in_blocks: Iterable[str],
    block_prefixes: Sequence[str],
    checkpoint_block_prefixes: Sequence[str],
    recipe: Recipe | None = None,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `quantization_config` dict of format `fmt` for a plan.

    spec: the global grid; layer_specs: module name → grid of every quantized layer; fp_in_blocks:
    Linears inside the blocks kept in full precision; block_prefixes / checkpoint_block_prefixes:
    the block lists by module and by checkpoint name. recipe / extra_info add informational keys.
    """
    f = get_format(fmt)
    if f.quant_method == COMPRESSED_METHOD:  # its own schema: one config group per grid, fp Linears ignored
        from signround.adapters.checkpoint import compressed

        qc = compressed.build_config(layer_specs, list(fp_in_blocks))
        qc.update({k: v for k, v in (extra_info or {}).items() if v is not None})
        return qc
    blocks = list(dict.fromkeys([*block_prefixes, *checkpoint_block_prefixes]))
    overrides: dict[str, dict[str, Any]] = {}
    for name, s in sorted(layer_specs.items()):
        if not in_blocks(name, block_prefixes):
            overrides[name] = _spec_dict(s)  # e.g. lm_head: outside blocks, spelled out in full
        elif s != spec:
            overrides[name] = {k: v for k, v in _spec_dict(s).items() if _spec_dict(spec)[k] != v}
    kept = {name: {"bits": FULL_PRECISION_BITS} for name in sorted(fp_in_blocks)}
    packing = f.choose_packing(spec, layer_specs.values())
    qc: dict[str, Any] = {**_spec_dict(spec), **_recipe_fields(recipe)}
    if f.quant_method == AUTO_ROUND_METHOD:
        qc.update(quant_method=f.quant_method, packing_format=packing.packing_format,
                  autoround_version=AUTOROUND_COMPAT_VERSION, signround_version=signround_version(),
                  block_name_to_quantize=",".join(blocks))
        if overrides or kept:
            qc["extra_config"] = {**overrides, **kept}
    else:
        qc.update(quant_method=f.quant_method, checkpoint_format=packing.checkpoint_format, desc_act=False,
                  true_sequential=False, static_groups=False, damp_percent=0.01,
                  lm_head=any(not in_blocks(n, block_prefixes) for n in layer_specs),
                  provider="signround", signround_version=signround_version(),
                  block_name_to_quantize=checkpoint_block_prefixes[0] if len(checkpoint_block_prefixes) == 1
                  else ",".join(checkpoint_block_prefixes))
        # GPTQModel rules carry the layer's whole grid (inside blocks too)
        dynamic = {f"{INCLUDE}{_anchored(n)}": _spec_dict(layer_specs[n]) for n in overrides}
        dynamic.update({f"{EXCLUDE}{_anchored(n)}": {} for n in kept})
        if dynamic:
            qc["dynamic"] = dynamic
    if extra_info:
        qc.update({k: v for k, v in extra_info.items() if v is not None})
    return qc


@attrs.frozen
class CheckpointPlan:
    """Each layer's grid as a `quantization_config` gives it: the top-level `bits`/`group_size`/`sym`,
    overridden by the `extra_config` rule that matches the layer, else by its `dynamic` rule
    (`rules.match_rule`). Layers are known by module name and checkpoint name."""

    base: Mapping[str, Any]
    extra_config: Mapping[str, Any]
    dynamic: Mapping[str, Any]

    @classmethod
    def of(cls, qc: Mapping[str, Any]) -> CheckpointPlan:
        if str(qc.get("quant_method", "")).lower() == COMPRESSED_METHOD:  # targets name layers; nothing global
            from signround.adapters.checkpoint import compressed

            rules = {n: _spec_dict(s) for n, s in compressed.layer_specs_of_config(qc).items()}
            rules.update({n: {"bits": FULL_PRECISION_BITS} for n in qc.get("ignore") or ()})
            return cls(base={}, extra_config=rules, dynamic={})
        return cls(base={k: qc[k] for k in _READ_KEYS if k in qc}, extra_config=dict(qc.get("extra_config") or {}),
                   dynamic=dict(qc.get("dynamic") or {}))

    def rule(self, *names: str) -> Rule[Any] | None:
        """The rule deciding the layer (an empty extra_config entry defers to `dynamic`), or None."""
        rule = match_rule(self.extra_config, *names)
        if rule is None or not rule.override:
            rule = match_rule(self.dynamic, *names) or rule
        return rule

    def spec(self, *names: str) -> QuantSpec | None:
        """The layer's grid, or None when the config keeps it in full precision (bits > 8)."""
        rule = self.rule(*names)
        override = rule.override if rule is not None else {}
        merged = {**self.base, **{k: override[k] for k in _READ_KEYS if k in override}}
        return grid({k: _READ_KEYS[k](v) for k, v in merged.items()})

    def kept_by_rule(self, *names: str) -> bool:
        """A rule of the config (not the global grid) keeps this layer in full precision."""
        return self.rule(*names) is not None and self.spec(*names) is None


def parse_quantization_config(qc: Mapping[str, Any]) -> tuple[Packing, CheckpointPlan]:
    """(packing, per-layer plan) of a `quantization_config`; NotImplementedError for an unknown
    quant_method / packing_format."""
    return packing_of_config(qc), CheckpointPlan.of(qc)


def read_quantization_config(path: Path) -> dict[str, Any]:
    """`quantization_config` from config.json, else quantization_config.json / quantize_config.json."""
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config")
    for name in (f.config_file for f in EXPORT_FORMATS.values()):
        if qc is None and (path / name).is_file():
            qc = json.loads((path / name).read_text())
    if qc is None:
        raise ValueError(f"{path} has no quantization_config (config.json, quantization_config.json or "
                         "quantize_config.json): not a quantized checkpoint")
    return qc
