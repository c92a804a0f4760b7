"""compressed-tensors checkpoints (what llm-compressor writes, format ``pack-quantized``), through
the `compressed-tensors` package (optional dependency: the `compressed-tensors` extra).

Per quantized Linear `name` (K = in_features, N = out_features, G groups):

| tensor | dtype | shape | content |
|---|---|---|---|
| `name.weight_packed` | int32 | [N, ceil(K·bits/32)] | signed codes q − 2^(bits−1), offset back and packed along K (`pack_to_int32`) |
| `name.weight_scale` | float16 | [N, G] | our fp16 scales (the grid's values; runtimes cast to the model dtype) |
| `name.weight_zero_point` | int32 | [ceil(N·bits/32), G] | asym only: z − 2^(bits−1), packed along N (`pack_to_int32(packed_dim=0)`) |
| `name.weight_shape` | int64 | [2] | (N, K) |

Dequantization (compressed-tensors' convention): w = scale · (q_signed − zp_signed), which is our
scale · (q − z). Each distinct grid is one `config_groups` entry whose targets are the exact
checkpoint module names; Linears kept in full precision (and lm_head unless quantized) are in
`ignore`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from signround.rounding.grid import QuantizedWeight
from signround.rounding.spec import QuantSpec

COMPRESSED_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _ct() -> Any:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:  # pragma: no cover - the extra is part of the test set-up
        raise ImportError("format 'compressed_tensors' needs the compressed-tensors package: "
                          "pip install 'signround[compressed]' (or compressed-tensors)") from None
    return compressed_tensors


def _args(spec: QuantSpec) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    grouped = spec.group_size > 0
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym,
                            strategy="group" if grouped else "channel",
                            group_size=spec.group_size if grouped else None, dynamic=False)


def build_config(layer_specs: Mapping[str, QuantSpec], ignore: Sequence[str]) -> dict[str, Any]:
    """`quantization_config` for checkpoint layer name → grid; ignore: Linears left in full precision."""
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[QuantSpec, list[str]] = {}
    for name, spec in sorted(layer_specs.items()):
        groups.setdefault(spec, []).append(name)
    schemes = {f"group_{i}": QuantizationScheme(targets=names, weights=_args(spec), format=PACKED_FORMAT)
               for i, (spec, names) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])))}
    qc = QuantizationConfig(config_groups=schemes, format=PACKED_FORMAT, ignore=sorted(ignore),
                            quantization_status=QuantizationStatus.COMPRESSED)
    # the keys ModelCompressor.update_config writes
    return {"version": ct.__version__, "quant_method": COMPRESSED_METHOD, "sparsity_config": {},
            "transform_config": {}, **qc.model_dump(exclude={"quant_method"}, mode="json")}


def layer_specs_of_config(qc: Mapping[str, Any]) -> dict[str, QuantSpec]:
    """Checkpoint layer name → grid from a compressed-tensors config whose targets are layer names
    (what `build_config` writes; class targets such as "Linear" are resolved by the caller)."""
    out: dict[str, QuantSpec] = {}
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("type", "int") != "int":
            raise NotImplementedError(f"compressed-tensors weights of type {w.get('type')!r} are not read by signround")
        spec = QuantSpec(int(w["num_bits"]), int(w.get("group_size") or -1), bool(w.get("symmetric", True)))
        for target in group.get("targets", []):
            out[target] = spec
    return out


def pack_layer(qw: QuantizedWeight) -> dict[str, Tensor]:
    """The tensors of one layer (suffix → tensor) from codes [N, K], scale/zero [N, G]."""
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits = qw.spec.bits
    offset = 1 << (bits - 1)
    out = {"weight_packed": pack_to_int32((qw.codes.to(torch.int32) - offset).to(torch.int8), bits),
           "weight_scale": qw.scale.to(torch.float16).contiguous(),
           "weight_shape": torch.tensor(tuple(qw.codes.shape), dtype=torch.int64)}
    if not qw.spec.sym:
        zp = (qw.zero.to(torch.int32) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    return out


def unpack_layer(tensors: Mapping[str, Tensor], spec: QuantSpec) -> QuantizedWeight:
    """The inverse of `pack_layer` (our grid: codes in [0, 2^bits − 1], z as an unsigned code)."""
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = spec.bits
    offset = 1 << (bits - 1)
    shape = torch.Size(int(v) for v in tensors["weight_shape"].tolist())
    codes = unpack_from_int32(tensors["weight_packed"], bits, shape).to(torch.int32) + offset
    scale = tensors["weight_scale"]
    if spec.sym:
        zero = torch.full(scale.shape, offset, dtype=torch.int32)
    else:
        zero = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size((shape[0], scale.shape[1])),
                                 packed_dim=0).to(torch.int32) + offset
    return QuantizedWeight(codes=codes, scale=scale.to(torch.float16), zero=zero, spec=spec)


def native_keys(keys: list[str]) -> list[str]:
    """A compressed-tensors checkpoint's keys as the loader reads them: each layer's four tensors
    become its native ``qweight`` / ``qzeros`` / ``scales``."""
    out = []
    for key in keys:
        base, _, suffix = key.rpartition(".")
        if suffix == "weight_packed":
            out += [f"{base}.qweight", f"{base}.qzeros", f"{base}.scales"]
        elif suffix not in TENSORS:
            out.append(key)
    return out


def native_tensors(tensors: Iterable[tuple[str, Tensor]], spec_of: Callable[[str], QuantSpec | None]
                   ) -> Iterator[tuple[str, Tensor]]:
    """`tensors` with each layer's compressed-tensors group converted to the native packing (the
    same codes, scales and zero points; `unpack_layer` then `QuantLinear.from_quantized`) once all
    of it has been read; spec_of: checkpoint layer name → its grid."""
    from signround.adapters.checkpoint.formats import NATIVE_PACKING
    from signround.adapters.checkpoint.qlinear import QuantLinear

    pending: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors:
        base, _, suffix = key.rpartition(".")
        if suffix not in TENSORS:
            yield key, tensor
            continue
        group = pending.setdefault(base, {})
        group[suffix] = tensor
        spec = spec_of(base)
        if spec is None:
            raise ValueError(f"{base} has packed weights but the quantization_config keeps it in full precision")
        if {"weight_packed", "weight_scale", "weight_shape"} <= group.keys() and (spec.sym or "weight_zero_point" in group):
            ql = QuantLinear.from_quantized(unpack_layer(pending.pop(base), spec), packing=NATIVE_PACKING, name=base)
            for name in ("qweight", "qzeros", "scales"):
                yield f"{base}.{name}", getattr(ql, name)
    if pending:
        raise ValueError(f"incomplete compressed-tensors layers: {sorted(pending)[:3]}")
