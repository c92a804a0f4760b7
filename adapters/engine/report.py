"""What a quantization run produced: per-block results (data, before they touch the model),
per-layer grids for exporters, per-block losses, timings."""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping, Optional

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


# How a block's result came about: tuned on calibration data (iters 0 included), rounded to
# nearest without data, loaded from a resume store, or left alone (the model never called it).
BlockSource = Literal["tuned", "rounded", "replayed", "not_called"]


@attrs.frozen
class BlockReport:
    """One block: MSE to the fp targets over all samples with RTN weights and with the kept
    weights (None without calibration data), the tuning iterations, wall time.

    kept_rtn: tuning ended above RTN's loss on all samples (the best iterate is chosen on
    mini-batch losses), so the block kept its RTN weights (`Recipe.use_best`); loss_tuned is then
    RTN's loss. source: see BlockSource (a replayed block's losses are those of the run that tuned it).
    not_routed: MoE expert layers ("….experts.3.w1") of experts that no calibration token was routed
    to while the block was tuned: they got no gradient and kept their round-to-nearest weights.
    phases: where the block's seconds went (what a first block's compile and warm-up add shows here).
    """

    name: str
    layers: tuple[str, ...]
    loss_rtn: Optional[float]
    loss_tuned: Optional[float]
    seconds: float
    iters: int = 0
    kept_rtn: bool = False
    source: BlockSource = "tuned"
    not_routed: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: wall seconds of the block's phases (setup: from the block's start, its load, move to the device and
    #: pure view, host work whose copies may still be queued; targets: the fp pass and its finite check;
    #: score_rtn, tune, score_tuned; outputs: the next block's inputs), each but setup read at a host sync
    phases: Mapping[str, float] = attrs.field(factory=dict, converter=dict)

    @property
    def loss_kept(self) -> Optional[float]:
        """The loss of the weights the block ends with."""
        return self.loss_rtn if self.kept_rtn else self.loss_tuned


@attrs.frozen
class BlockResult:
    """What the work on one block produced, before anything is written to the model.

    name: the block ("model.layers.3"). weights: weight name inside the block ("mlp.up_proj.weight")
    → its quantized values (dequantized, in the weight's dtype, [out, in]); only quantized layers.
    layers: full layer name → LayerResult. skipped: full layer name → why it stays in full precision
    (decided by this block's work, e.g. the model never called the block).
    """

    name: str
    weights: Mapping[str, Tensor]
    layers: Mapping[str, LayerResult]
    report: BlockReport
    skipped: Mapping[str, str] = attrs.field(factory=dict)


#: an unfused MoE expert's matrix (`hf/experts.py`): "model.layers.0.mlp.experts.3.w1"
_EXPERT = re.compile(r"\.experts\.\d+\.[^.]+$")


def _num(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@attrs.frozen
class QuantReport:
    """The result of `quantize_model`.

    block_name_to_quantize: the block-list prefixes, as the auto_round config names them.
    layers: full layer name → LayerResult (every quantized layer). skipped: full layer name → why it
    stayed in full precision. other_weights: every other weight matrix kept in full precision
    (parameter name → why: MoE routers and other non-Linear weights inside the blocks,
    embeddings and lm_head outside; `LayerPlan.other_weights`). settings: what the run was asked to
    do (calibration source, recipe, grid, device), as the front end recorded it. peak_memory:
    (bytes, what was measured).
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
    other_weights: Mapping[str, str] = attrs.field(factory=dict)
    settings: Mapping[str, Any] = attrs.field(factory=dict)

    def kept_fp(self) -> dict[str, int]:
        """How many weights stay in full precision: Linear layers in the blocks, other weights in the
        blocks (MoE routers, …), weights outside the blocks."""
        outside = sum(1 for why in self.other_weights.values() if why.startswith("outside"))
        return {"layers": len(self.skipped), "other_in_blocks": len(self.other_weights) - outside,
                "outside_blocks": outside}

    def experts(self) -> dict[str, Any]:
        """MoE expert layers ("….experts.{e}.{leaf}", `hf/experts.py`): how many are quantized, how
        many stay in full precision, and those of experts no calibration token reached (RTN)."""
        not_routed = [n for b in self.blocks for n in b.not_routed]
        return {"quantized": sum(1 for n in self.layers if _EXPERT.search(n)),
                "kept_in_full_precision": sum(1 for n in self.skipped if _EXPERT.search(n)),
                "not_routed": len(not_routed), "not_routed_layers": not_routed}

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
            "kept_in_full_precision": self.kept_fp(),
            "other_weights_not_quantized": dict(self.other_weights),
            "moe_experts": self.experts(),
            "settings": dict(self.settings),
            "mean_loss_rtn": (sum(b.loss_rtn for b in tuned) / len(tuned)) if tuned else None,
            "mean_loss_tuned": (sum(b.loss_tuned for b in tuned) / len(tuned)) if tuned else None,
            "blocks": [{"name": b.name, "layers": len(b.layers), "loss_rtn": _num(b.loss_rtn),
                        "loss_tuned": _num(b.loss_tuned), "seconds": b.seconds, "iters": b.iters,
                        "kept_rtn": b.kept_rtn, "source": b.source, "not_routed": len(b.not_routed)}
                       for b in self.blocks],
            "extra_config": self.extra_config(),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2)
