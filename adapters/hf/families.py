"""What block-wise tuning can and cannot do per model family, and naming a model's block lists.

    block_lists(model, None)                      # discovered (registry by model_type, else generic)
    block_lists(model, "model.layers,vision")     # comma-separated names or regexes of ModuleLists
    check_vision_blocks(model_type, block_names)  # quant_nontext_module: a vision list to tune?
    check_served(model_type, targets)             # does each target runtime serve this family?

Each check raises ValueError with what is not supported and what to do instead.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional, Sequence, Union

from torch import nn

from signround.adapters.hf.blocks import BLOCK_REGISTRY, blocks_of, find_block_lists, is_vision_name



def model_type(model: Any) -> Optional[str]:
    """`model.config.model_type`, or None for a model without a Hugging Face config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def check_vision_blocks(family: Optional[str], block_names: Sequence[str]) -> None:
    """quant_nontext_module needs a vision block list among the lists to quantize (a family whose
    vision tower has no registered or recognisable block list is refused before any tuning)."""
    vision = [n for n in block_names if is_vision_name(n)]
    if not vision:
        raise ValueError(f"quant_nontext_module=True, but signround finds no vision block list to tune in this "
                         f"{family or 'model'} (block lists: {', '.join(block_names) or '-'}); name the vision "
                         "tower's list with to_quant_block_names (e.g. 'model.vision_tower.encoder.layers,"
                         "model.language_model.layers'), or quantize the text decoder only (the default)")


# Families a runtime does not serve at all, whatever is quantized: vLLM 0.33 lists Mllama in
# `vllm/model_executor/models/registry.py` `_PREVIOUSLY_SUPPORTED_MODELS` (last served by 0.10.2).
UNSERVED = {("vllm", "mllama"): "vLLM 0.33 no longer serves MllamaForConditionalGeneration (its registry lists it "
                                "as previously supported, last in vLLM 0.10.2)"}


def check_served(family: Optional[str], targets: Sequence[str]) -> None:
    """Refuse a target runtime that does not serve this model family at all."""
    for target in targets:
        why = UNSERVED.get((target, family or ""))
        if why:
            raise ValueError(f"target {target!r}: {why}; no checkpoint of this model loads there; drop the "
                             "target (transformers and signround load it)")


def block_lists(model: nn.Module, names: Union[str, Sequence[str], None], quant_nontext_module: bool = False,
                ) -> list[str]:
    """The block-list prefixes to quantize: discovered when `names` is None (with a warning for a
    family without a registered layout), else the lists `names` gives, checked against the model:
    a string is comma-separated exact names or regexes of the model's ModuleLists; a sequence is
    taken as exact prefixes. Discovery does not run when the names are given."""
    if names is None:
        family = model_type(model)
        if family not in BLOCK_REGISTRY:
            warnings.warn(f"model type {family!r} has no registered block layout; using the generic finder "
                          f"(the largest list of repeated blocks). Known types: {sorted(BLOCK_REGISTRY)}. Check the "
                          "plan with --dry-run, or name the blocks with to_quant_block_names.", stacklevel=4)
        found = find_block_lists(model, quant_nontext_module)
        if not found:
            raise ValueError(f"found no block list (a ModuleList of decoder layers) in {type(model).__name__}; "
                             "name one with to_quant_block_names, e.g. 'model.layers'")
        return found
    if isinstance(names, str):
        patterns = [p.strip() for p in names.split(",") if p.strip()]
        all_lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        chosen: list[str] = []
        for pat in patterns:
            exact = [n for n in all_lists if n == pat]
            hits = exact or [n for n in all_lists if re.search(pat, n)]
            if not hits:
                raise ValueError(f"to_quant_block_names: {pat!r} matches no block list; lists in this model: "
                                 f"{all_lists[:12]}")
            chosen += [h for h in hits if h not in chosen]
        return chosen
    out = list(names)
    for n in out:
        try:
            blocks_of(model, n)
        except (AttributeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"to_quant_block_names: {n!r} is not a block list of this model ({err})") from None
    return out


__all__ = ["UNSERVED", "block_lists", "check_served",
           "check_vision_blocks", "model_type"]
