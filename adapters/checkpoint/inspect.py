"""`signround inspect`: what a checkpoint holds, read from config.json and safetensors headers only.

Each packed layer's grid comes from `config.parse_quantization_config` (the loader's reading), its
in/out features from the packing's qweight layout. Bits per weight count every tensor a quantized
layer stores (codes, scales, zero points, g_idx; not its bias) at its stored dtype: `stored_bits`
over the headers here, and over `layer_tensors` (what export writes) when a plan is priced before
any tuning (`--target-bits`, spec/mixed-precision.md).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
from safetensors import safe_open

from signround.adapters.checkpoint.config import CheckpointPlan, parse_quantization_config
from signround.adapters.checkpoint.compressed import TENSORS as COMPRESSED_TENSORS
from signround.adapters.checkpoint.formats import (COMPRESSED_METHOD, PACKED_TENSORS, SYM_PACKING, Packing,
                                                  format_of_config, get_format)
from signround.adapters.checkpoint.rules import is_full_precision
from signround.adapters.checkpoint.targets import check, checkpoint_view
from signround.rounding.spec import QuantSpec

QUANT_SUFFIXES = tuple(f".{t}" for t in (*PACKED_TENSORS, *COMPRESSED_TENSORS))
#: bits per element of the safetensors dtypes
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64}


def stored_bits(tensors: Iterable[tuple[str, Sequence[int]]]) -> int:
    """Bits the (safetensors dtype, shape) pairs occupy."""
    return sum(DTYPE_BITS[dtype] * math.prod(shape) for dtype, shape in tensors)


def layer_tensors(fmt: str, spec: QuantSpec, in_features: int, out_features: int,
                  packing: Packing | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The quantized tensors export writes for one Linear [out, in] on `spec` in format `fmt`:
    suffix → (safetensors dtype, shape); `packing` as the format chose it for the plan (default:
    its choice for `spec` alone). Matches `QuantLinear`'s buffers and `compressed.py`'s table."""
    k, n, groups = in_features, out_features, spec.num_groups(in_features)
    if get_format(fmt).quant_method == COMPRESSED_METHOD:
        out = {"weight_packed": ("I32", (n, -(-k * spec.bits // 32))), "weight_scale": ("F16", (n, groups)),
               "weight_shape": ("I64", (2,))}
        if not spec.sym:
            out["weight_zero_point"] = ("I32", (-(-n * spec.bits // 32), groups))
        return out
    p = packing or get_format(fmt).choose_packing(spec, [spec])
    out = {"qweight": ("I32", p.qweight_shape(k, n, spec.bits)), "qzeros": ("I32", (groups, -(-n * spec.bits // 32))),
           "scales": ("F16", (groups, n))}
    if p.has_g_idx:
        out["g_idx"] = ("I32", (k,))
    return out


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _shards(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors files; is it a checkpoint directory?")
    return files


def _reading(qc: dict[str, Any]) -> tuple[Packing | None, CheckpointPlan]:
    """The packing (None when the config names none we know) and the per-layer plan."""
    try:
        return parse_quantization_config(qc)
    except NotImplementedError:
        return None, CheckpointPlan.of(qc)


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summary of a checkpoint: format, global grid, per-layer bits/group size, sizes, fp layers."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {str(p)!r} is not a directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{p} has no config.json, so it is not a Hugging Face checkpoint")
    config = _read_json(cfg_path)
    qc = config.get("quantization_config") or {}
    packing, plan = _reading(qc)
    layout = packing or SYM_PACKING  # an unknown packing: assume the GPTQ row layout
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    total_bytes = 0
    for shard in _shards(p):
        total_bytes += shard.stat().st_size
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    layers = {}
    stored: dict[str, dict[str, Any]] = {}  # what each quantized layer's tensors occupy
    compressed = str(qc.get("quant_method", "")).lower() == COMPRESSED_METHOD
    packed_suffix = ".weight_packed" if compressed else ".qweight"
    for key, (_dtype, shape) in tensors.items():
        if not key.endswith(packed_suffix):
            continue
        name = key[: -len(packed_suffix)]
        spec = plan.spec(name)
        scales = tensors.get(name + (".weight_scale" if compressed else ".scales"))
        if spec is None:  # packed, though the config keeps it in full precision: nothing to read it with
            in_features = out_features = None
        elif compressed:  # weight_packed [N, K·bits/32]; scales [N, G]
            in_features, out_features = shape[1] * 32 // spec.bits, shape[0]
            scales = (scales[0], (scales[1][1], scales[1][0])) if scales else None
        else:
            in_features, out_features = layout.features(shape, spec.bits)
        layers[name] = {"bits": spec.bits if spec else None, "group_size": spec.group_size if spec else None,
                        "sym": spec.sym if spec else None, "in_features": in_features,
                        "out_features": out_features, "groups": scales[1][0] if scales else None}
        bits = stored_bits(tensors[name + s] for s in QUANT_SUFFIXES if name + s in tensors)
        weights = (in_features or 0) * (out_features or 0)
        stored[name] = {"stored_bits": bits, "weights": weights, "bits_per_weight": bits / weights if weights else None}
    fp_layers = sorted(k[: -len(".weight")] for k, (_d, s) in tensors.items()
                       if k.endswith(".weight") and len(s) == 2 and k[: -len(".weight")] not in layers)
    # kept in full precision by a rule: layers of the checkpoint (extra_config, or GPTQ `dynamic` "-:"),
    # and extra_config entries as written (module names, which may differ from the checkpoint's)
    kept = {n for n in fp_layers if plan.kept_by_rule(n)}
    kept.update(k for k, v in plan.extra_config.items()
                if isinstance(v, dict) and is_full_precision(v.get("bits", 0)))
    dtypes = Counter(d for k, (d, _s) in tensors.items() if not k.endswith(QUANT_SUFFIXES))
    shapes = {name: tensors[name + ".weight"][1] for name in fp_layers}
    text = config.get("text_config") or {}
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    info = {
        "path": str(p),
        "format": format_of_config(qc),
        "quant_method": qc.get("quant_method"),
        "packing_format": qc.get("packing_format"),
        "packing": packing.name if packing else None,
        "bits": qc.get("bits"),
        "group_size": qc.get("group_size"),
        "sym": qc.get("sym"),
        "block_name_to_quantize": qc.get("block_name_to_quantize"),
        "quantized_layers": len(layers),
        "bits_histogram": {str(k): n for k, n in Counter(v["bits"] for v in layers.values()).items()},
        # every stored bit of the quantized layers over their weights (spec/mixed-precision.md, "Bit accounting")
        "average_bits": _average_bits(stored.values()),
        "layer_bits": stored,
        "layers": layers,
        "full_precision_2d_weights": fp_layers,
        "kept_fp_by_config": sorted(kept),
        "other_tensor_dtypes": dict(dtypes),
        "tensors": len(tensors),
        "size_bytes": total_bytes,
        "files": sorted(x.name for x in p.iterdir() if x.is_file()),
        "full_precision_shapes": {n: list(s) for n, s in shapes.items()},
        "tied_lm_head": tied and not any(n.endswith("lm_head") for n in [*fp_layers, *layers]),
    }
    info["verdicts"] = {t: attrs.asdict(v) for t, v in check(checkpoint_view(info)).items()}
    return info


def _average_bits(layers: Iterable[dict[str, Any]]) -> float | None:
    read = [v for v in layers if v["weights"]]
    weights = sum(v["weights"] for v in read)
    return sum(v["stored_bits"] for v in read) / weights if weights else None


def print_inspection(info: dict[str, Any]) -> None:
    """A readable table of `inspect_checkpoint`'s result."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(show_header=False, title=f"checkpoint {info['path']}")
    for key in ("quant_method", "packing_format", "packing", "bits", "group_size", "sym", "block_name_to_quantize",
                "quantized_layers", "bits_histogram", "tensors"):
        head.add_row(key, str(info[key]))
    if info.get("average_bits") is not None:
        head.add_row("bits per weight", f"{info['average_bits']:.4f} (codes, scales and zero points of the quantized "
                     "layers)")
    head.add_row("size", f"{info['size_bytes'] / 2**20:.1f} MiB")
    head.add_row("full-precision 2-D weights", str(len(info["full_precision_2d_weights"])))
    head.add_row("kept fp by the config", ", ".join(info["kept_fp_by_config"]) or "-")
    console.print(head)
    table = Table(title="quantized layers")
    for col in ("layer", "bits", "group", "sym", "in", "out", "bits/weight"):
        table.add_column(col)
    for name, v in info["layers"].items():
        per = info.get("layer_bits", {}).get(name, {}).get("bits_per_weight")
        bpw = "-" if per is None else f"{per:.3f}"
        table.add_row(name, str(v["bits"]), str(v["group_size"]), str(v["sym"]), str(v["in_features"]),
                      str(v["out_features"]), bpw)
    console.print(table)
    verdicts = Table(title="will it load? (spec/format.md, Loadability)")
    for col in ("target", "verdict", "why / notes"):
        verdicts.add_column(col)
    for target, v in info["verdicts"].items():
        verdicts.add_row(target, "loads" if v["loads"] else "FAILS",
                         "\n".join([*v["problems"], *(f"note: {n}" for n in v["notes"])]) or "-")
    console.print(verdicts)
