"""The functional core: grid math, rounding params, signed SGD, block tuning, packing.

Pure functions over immutable attrs states; no nn.Module, no Hugging Face, no I/O, no devices,
no environment.
"""

from signround.rounding import best, signsgd
from signround.rounding.grid import (
    GroupedWeight,
    QuantizedWeight,
    codes_from_dequantized,
    dequantize_codes,
    group_weight,
    qdq,
    qdq_grouped,
    qparams,
    quantize_codes,
    quantize_weight,
    ste_round,
)
from signround.rounding.pack import pack_cols, pack_rows, unpack_cols, unpack_rows
from signround.rounding.params import RoundingParams
from signround.rounding.recipe import PRESETS, Recipe, preset
from signround.rounding.recompute import QdqOps, qdq_forward, qdq_vjp, recomputing_qdq
from signround.rounding.signsgd import SignSGD, SignSGDState, sign_sgd
from signround.rounding.spec import QuantSpec
from signround.rounding.tune import (
    BlockInputs,
    StepParts,
    TuneResult,
    TuneState,
    accumulate,
    block_loss,
    init,
    loss_and_grads,
    masked_mse,
    prepare,
    quantized_weights,
    result,
    sample_indices,
    split_step,
    step,
    step_batches,
    tune_block,
)

__all__ = [
    "BlockInputs", "GroupedWeight", "PRESETS", "QdqOps", "QuantSpec", "QuantizedWeight", "Recipe", "RoundingParams",
    "SignSGD", "SignSGDState", "StepParts", "TuneResult", "TuneState", "accumulate", "best", "block_loss",
    "codes_from_dequantized", "dequantize_codes", "group_weight", "init", "loss_and_grads", "masked_mse", "pack_cols",
    "pack_rows", "prepare", "preset", "qdq", "qdq_forward", "qdq_grouped", "qdq_vjp", "qparams", "quantize_codes",
    "quantize_weight", "quantized_weights", "recomputing_qdq", "result", "sample_indices", "sign_sgd", "signsgd",
    "split_step", "ste_round", "step", "step_batches", "tune_block", "unpack_cols", "unpack_rows",
]
