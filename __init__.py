"""signround: sign-gradient rounding (AutoRound/SignRound) for multimodal and text LLMs.

    from signround import AutoRoundMLLM
    ar = AutoRoundMLLM(model, tokenizer, processor=processor, bits=4, group_size=128, dataset="llava.json")
    ar.quantize()
    ar.save_quantized("out/", format="auto_round")

Heavy imports (transformers) happen on first use of the names that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from signround.rounding import QuantSpec, Recipe, RoundingParams, preset

__version__ = "0.1.0"

_LAZY = {
    "AutoRound": "signround.adapters.frontends.facade",
    "AutoRoundMLLM": "signround.adapters.frontends.facade",
    "quantize_model": "signround.adapters.engine.loop",
    "capture_inputs": "signround.adapters.hf.capture",
    "as_pure": "signround.adapters.hf.pure",
    "write_back": "signround.adapters.hf.pure",
    "save_quantized": "signround.adapters.checkpoint.export",
    "load_quantized": "signround.adapters.checkpoint.loader",
    "QuantReport": "signround.adapters.engine.report",
    "BlockResult": "signround.adapters.engine.report",
    "QuantizeConfig": "signround.adapters.frontends.facade",
}

if TYPE_CHECKING:  # pragma: no cover
    from signround.adapters.hf.capture import capture_inputs
    from signround.adapters.engine.loop import quantize_model
    from signround.adapters.checkpoint.export import save_quantized
    from signround.adapters.frontends.facade import AutoRound, AutoRoundMLLM, QuantizeConfig
    from signround.adapters.checkpoint.loader import load_quantized
    from signround.adapters.hf.pure import as_pure, write_back
    from signround.adapters.engine.report import BlockResult, QuantReport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'signround' has no attribute {name!r}")


__all__ = ["AutoRound", "AutoRoundMLLM", "BlockResult", "QuantReport", "QuantSpec", "QuantizeConfig", "Recipe",
           "RoundingParams", "__version__", "as_pure", "capture_inputs", "load_quantized", "preset", "quantize_model",
           "save_quantized", "write_back"]
