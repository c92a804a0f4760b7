"""Per-layer rules: the one matcher from layer names to a rule, and the one full-precision rule.

Used for a user's `layer_config` (`select_layers`) and for a checkpoint's `extra_config` and GPTQ
`dynamic` (`config.parse_quantization_config`, so loader and inspect). A rule set is a mapping
whose keys are exact layer names, regular expressions, or GPTQModel-style prefixed expressions
(``"+:regex"``: the value applies; ``"-:regex"``: the layer stays in full precision).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import attrs

from signround.rounding.spec import QuantSpec

#: the bits we write for a layer kept in full precision
FULL_PRECISION_BITS = 16
#: the widest integer grid; more bits than this means "not quantized" (auto-round's rule too)
MAX_QUANT_BITS = 8
#: the grid settings a rule may carry
GRID_KEYS = ("bits", "group_size", "sym", "data_type")
INCLUDE, EXCLUDE = "+:", "-:"

V = TypeVar("V")


def is_full_precision(bits: Any) -> bool:
    """The one rule: a layer with more than 8 bits (16 in what we write) stays in full precision."""
    return int(bits) > MAX_QUANT_BITS


@attrs.frozen
class Rule(Generic[V]):
    """The entry of a rule set that matched: its key as written, the key's regex (prefix removed),
    its value, and whether it is a ``-:`` rule (keep the layer in full precision)."""

    key: str
    pattern: str
    value: V
    excluded: bool = False

    @property
    def override(self) -> Any:
        """The value, or ``{"bits": 16}`` for a ``-:`` rule."""
        return {"bits": FULL_PRECISION_BITS} if self.excluded else self.value


def _split(key: str) -> tuple[str, bool]:
    if key.startswith((INCLUDE, EXCLUDE)):
        return key[len(INCLUDE):], key.startswith(EXCLUDE)
    return key, False


def match_rule(rules: Mapping[str, V], *names: str) -> Rule[V] | None:
    """The rule of `rules` for a layer known by `names` (module name, checkpoint name), or None.

    An exact key wins (the names in the order given); else the first key, in insertion order,
    whose regex (``+:`` / ``-:`` prefix removed) `re.search`-es one of the names. Keys that are not
    valid regular expressions match exactly only.

    >>> match_rule({"model.layers.0.mlp.up_proj": 1, r"\\.o_proj$": 2}, "model.layers.3.self_attn.o_proj").value
    2
    >>> match_rule({r"-:^model\\.layers\\.0\\.": {}}, "model.layers.0.mlp.up_proj").excluded
    True
    """
    for name in names:
        if name in rules:
            return Rule(name, re.escape(name), rules[name])
    for key, value in rules.items():
        pattern, excluded = _split(key)
        try:
            if any(re.search(pattern, name) for name in names):
                return Rule(key, pattern, value, excluded)
        except re.error:
            continue
    return None


def grid(fields: Mapping[str, Any]) -> QuantSpec | None:
    """The QuantSpec of `fields` (bits, group_size, sym, data_type; missing ones QuantSpec's
    defaults), or None when `bits` says full precision (> 8)."""
    if is_full_precision(fields.get("bits", FULL_PRECISION_BITS)):
        return None
    return QuantSpec(**{k: fields[k] for k in GRID_KEYS if k in fields})


def apply_override(spec: QuantSpec, override: QuantSpec | Mapping[str, Any]) -> QuantSpec | None:
    """`spec` after an override (a QuantSpec replaces it; a mapping changes the keys it has);
    None means keep the layer in full precision."""
    if isinstance(override, QuantSpec):
        return override
    return grid({**spec.to_dict(), **{k: override[k] for k in GRID_KEYS if k in override}})
