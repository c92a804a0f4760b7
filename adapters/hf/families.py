"""What block-wise tuning can and cannot do per model family, and naming a model's block lists.

    block_lists(model, None)                      # discovered (registry by model_type, else generic)
    block_lists(model, "model.layers,vision")     # comma-separated names or regexes of ModuleLists
    check_vision_blocks(model_type)               # quant_nontext_module on this family?
    check_image_calibration(model_type)           # image-text calibration on this family?

Each check raises ValueError with what is not supported and what to do instead.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional, Sequence, Union

from torch import nn

from signround.adapters.hf.blocks import BLOCK_REGISTRY, blocks_of, find_block_lists

# Vision towers that take all images' patches packed into one sequence (no per-sample batch
# dimension, cu_seqlens boundaries): their blocks cannot be tuned on sampled mini-batches yet.
PACKED_VISION_TOWERS = ("qwen2_vl", "qwen2_5_vl")
# Families whose decoder blocks take image features without a per-sample batch dimension.
PACKED_CROSS_ATTENTION = ("mllama",)


def model_type(model: Any) -> Optional[str]:
    """`model.config.model_type`, or None for a model without a Hugging Face config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def check_vision_blocks(family: Optional[str]) -> None:
    """Refuse quant_nontext_module for families whose vision blocks cannot be split into samples."""
    if family in PACKED_VISION_TOWERS:
        raise ValueError(f"quant_nontext_module is not supported for {family}: its vision blocks take every "
                         "image's patches packed into one sequence, which block-wise tuning cannot split into "
                         "samples yet; quantize the text decoder only (the default)")


def check_image_calibration(family: Optional[str]) -> None:
    """Refuse image-text calibration for families whose decoder blocks cannot be split into samples."""
    if family in PACKED_CROSS_ATTENTION:
        raise ValueError(f"image-text calibration is not supported for {family} yet: its cross-attention "
                         "states are packed per image tile, which block-wise tuning cannot split into samples; "
                         "calibrate on text (the default: no dataset, or a text file)")


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


__all__ = ["PACKED_CROSS_ATTENTION", "PACKED_VISION_TOWERS", "block_lists", "check_image_calibration",
           "check_vision_blocks", "model_type"]
