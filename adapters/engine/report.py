"""What a quantization run produced: per-layer grids for exporters, per-block losses, timings."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import attrs
import orjson
from torch import Tensor

from signround.rounding import QuantSpec, Recipe


@attrs.frozen
class LayerResult:
    """What an exporter needs for one quantized layer.

    name: full module name in the model ("model.layers.0.self_attn.q_proj"); spec: its grid;
    scale: fp16 [out, groups]; zero: int32 [out, groups]. The layer's weight holds the dequantized
    values, so codes = round(W / scale + zero) (`signround.rounding.codes_from_dequantized`); for
    sym, zero = 2^(bits-1) and scales may be negative.
    """

    name: str
    spec: QuantSpec
    scale: Tensor
    zero: Tensor


@attrs.frozen
class BlockReport:
    """One tuned block: MSE to the fp targets over all samples with RTN weights and with the tuned
    weights (None without calibration data), the tuning-loss history length, wall time."""

    name: str
    layers: tuple[str, ...]
    loss_rtn: Optional[float]
    loss_tuned: Optional[float]
    seconds: float
    iters: int = 0


def _num(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@attrs.frozen
class QuantReport:
    """The result of `quantize_model`.

    block_name_to_quantize: the block-list prefixes, as the auto_round config names them.
    layers: full layer name → LayerResult (every quantized layer). skipped: full layer name → why it
    stayed in full precision. peak_memory: (bytes, what was measured).
    """

    spec: QuantSpec
    recipe: Recipe
    block_name_to_quantize: tuple[str, ...]
    blocks: tuple[BlockReport, ...]
    layers: Mapping[str, LayerResult]
    skipped: Mapping[str, str]
    seconds: float
    device: str
    peak_memory_bytes: Optional[int] = None
    peak_memory_kind: str = ""

    def extra_config(self) -> dict[str, dict[str, Any]]:
        """Per-layer entries that differ from the global spec (skipped layers as bits 16), the
        shape of `quantization_config["extra_config"]`."""
        out: dict[str, dict[str, Any]] = {}
        for name, res in self.layers.items():
            diff = {k: v for k, v in res.spec.to_dict().items() if self.spec.to_dict()[k] != v}
            if diff:
                out[name] = diff
        for name in self.skipped:
            out[name] = {"bits": 16}
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable digest (no tensors)."""
        tuned = [b for b in self.blocks if b.loss_tuned is not None and b.loss_rtn is not None]
        return {
            "spec": self.spec.to_dict(),
            "recipe": attrs.asdict(self.recipe),
            "block_name_to_quantize": list(self.block_name_to_quantize),
            "device": self.device,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "layers_quantized": len(self.layers),
            "layers_skipped": dict(self.skipped),
            "mean_loss_rtn": (sum(b.loss_rtn for b in tuned) / len(tuned)) if tuned else None,
            "mean_loss_tuned": (sum(b.loss_tuned for b in tuned) / len(tuned)) if tuned else None,
            "blocks": [{"name": b.name, "layers": len(b.layers), "loss_rtn": _num(b.loss_rtn),
                        "loss_tuned": _num(b.loss_tuned), "seconds": b.seconds, "iters": b.iters}
                       for b in self.blocks],
            "extra_config": self.extra_config(),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2)
