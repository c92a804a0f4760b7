"""The imperative shell: Hugging Face models in, quantized models and checkpoints out.

Rooms (see spec/architecture.md): `hf` (model surgery), `engine` (the block loop and its runtime),
`checkpoint` (the format), `frontends` (facade, demo, bench, evaluate, assets). The names below are
re-exported lazily, so importing one room (the CLI's format table, say) does not import them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "BLOCK_REGISTRY": "signround.adapters.hf.blocks", "LayerPlan": "signround.adapters.hf.blocks",
    "find_block_lists": "signround.adapters.hf.blocks", "register_blocks": "signround.adapters.hf.blocks",
    "select_layers": "signround.adapters.hf.blocks",
    "BlockCall": "signround.adapters.hf.capture", "CallLayout": "signround.adapters.hf.capture",
    "CapturedInputs": "signround.adapters.hf.capture", "capture_inputs": "signround.adapters.hf.capture",
    "as_pure": "signround.adapters.hf.pure", "write_back": "signround.adapters.hf.pure",
    "Accelerator": "signround.adapters.engine.device",
    "quantize_model": "signround.adapters.engine.loop", "run_block": "signround.adapters.engine.loop",
    "BlockReport": "signround.adapters.engine.report", "BlockResult": "signround.adapters.engine.report",
    "LayerResult": "signround.adapters.engine.report", "QuantReport": "signround.adapters.engine.report",
    "LayerQuant": "signround.adapters.checkpoint.files", "save_quantized": "signround.adapters.checkpoint.export",
    "load_quantized": "signround.adapters.checkpoint.loader", "QuantLinear": "signround.adapters.checkpoint.qlinear",
}

if TYPE_CHECKING:  # pragma: no cover
    from signround.adapters.checkpoint.export import save_quantized
    from signround.adapters.checkpoint.files import LayerQuant
    from signround.adapters.checkpoint.loader import load_quantized
    from signround.adapters.checkpoint.qlinear import QuantLinear
    from signround.adapters.engine.device import Accelerator
    from signround.adapters.engine.loop import quantize_model, run_block
    from signround.adapters.engine.report import BlockReport, BlockResult, LayerResult, QuantReport
    from signround.adapters.hf.blocks import BLOCK_REGISTRY, LayerPlan, find_block_lists, register_blocks, select_layers
    from signround.adapters.hf.capture import BlockCall, CallLayout, CapturedInputs, capture_inputs
    from signround.adapters.hf.pure import as_pure, write_back


def __getattr__(name: str) -> Any:
    if name == "resolve_device":
        return importlib.import_module("signround.adapters.engine.device").resolve
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'signround.adapters' has no attribute {name!r}")


__all__ = sorted([*_LAZY, "resolve_device"])
