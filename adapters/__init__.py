"""The imperative shell: Hugging Face models in, quantized models and checkpoints out."""

# --- block tuning engine (blocks, capture, pure blocks, devices, reports) ---
from signround.adapters.hf.blocks import (BLOCK_REGISTRY, LayerPlan, find_block_lists, register_blocks,
                                       select_layers)
from signround.adapters.hf.capture import BlockCall, CallLayout, CapturedInputs, capture_inputs
from signround.adapters.engine.device import Accelerator, resolve as resolve_device
from signround.adapters.engine.loop import quantize_model, run_block
from signround.adapters.hf.pure import as_pure, write_back
from signround.adapters.engine.report import BlockReport, BlockResult, LayerResult, QuantReport

__all__ = [
    # block tuning engine
    "Accelerator", "BLOCK_REGISTRY", "BlockCall", "BlockReport", "BlockResult", "CallLayout", "CapturedInputs",
    "LayerPlan", "LayerResult", "QuantReport", "as_pure", "capture_inputs", "find_block_lists", "quantize_model",
    "register_blocks", "resolve_device", "run_block", "select_layers", "write_back",
]

# --- checkpoints: export, QuantLinear, loader ---
from signround.adapters.checkpoint.files import LayerQuant
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.loader import load_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear

__all__ += ["LayerQuant", "QuantLinear", "load_quantized", "save_quantized"]
