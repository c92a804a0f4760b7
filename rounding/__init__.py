"""The functional core: grid math, rounding params, signed SGD, block tuning, packing.

Pure functions over immutable attrs states; no nn.Module, no Hugging Face, no I/O.
"""

from signround.rounding import signsgd
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
from signround.rounding.signsgd import SignSGDConfig, SignSGDState
from signround.rounding.spec import QuantSpec
from signround.rounding.tune import (
    BlockInputs,
    TuneResult,
    block_loss,
    init_params,
    loss_and_grads,
    masked_mse,
    prepare,
    quantized_weights,
    sample_indices,
    step,
    tune_block,
)

__all__ = [
    "BlockInputs", "GroupedWeight", "PRESETS", "QuantSpec", "QuantizedWeight", "Recipe", "RoundingParams",
    "SignSGDConfig", "SignSGDState", "TuneResult", "block_loss", "codes_from_dequantized", "dequantize_codes",
    "group_weight", "init_params", "loss_and_grads", "masked_mse", "pack_cols", "pack_rows", "prepare", "preset",
    "qdq", "qdq_grouped", "qparams", "quantize_codes", "quantize_weight", "quantized_weights", "sample_indices",
    "signsgd", "ste_round", "step", "tune_block", "unpack_cols", "unpack_rows",
]
