"""How a `QuantLinear` runs: the table of kernels, and the choice made once per layer, device and dtype.

| kernel | bits | device | compute dtypes (auto) | what runs |
|---|---|---|---|---|
| `int4_tinygemm` | 4 | CUDA, sm80+ | bfloat16; float16 (activations cast to bf16 and back) | `aten._weight_int4pack_mm` on words repacked by `aten._convert_weight_to_int4pack` |
| `int4_cpu` | 4 | CPU | bfloat16 (float16/float32 only when asked: torch has no vectorised path for them) | `aten._weight_int4pack_mm_for_cpu` on `aten._convert_weight_to_int4pack_for_cpu` |
| `int8` | 8, symmetric, one group per row | CPU (bfloat16), CUDA where torch registers it | `aten._weight_int8pack_mm` |
| `dequant` | any | any | any | the reference: `QuantLinear.dequant_forward` (dequantize, then `F.linear`) |

Many rows (prefill, batched scoring): tinygemm's time grows with the rows, cuBLAS's barely does
(26× slower at 2048 rows on an H200, spec/performance.md). Above a row count (`wide_rows`: by layer
size on CUDA, `WIDE_ROWS` on the CPU) an int4 layer instead dequantizes its words in one fused pass
(`dequant_rows`, compiled on CUDA) and runs `F.linear`: the same weight as the reference, so the same
output as `dequant_forward`.

The int4 kernels compute `w = (q - 8) · s + m` per group, so our grid `s · (q - z)` is passed as
`m = s · (8 - z)`, both in the compute dtype; a group size they do not take (> 256, or -1) is
expressed exactly by repeating each scale over sub-groups of 256/128/64/32. Their tolerance against
the reference is stated in spec/format.md ("Kernels").

Choice: `select` walks the table in order and takes the first kernel whose checks pass (`why_not`
returns None): op registered for the device (asked of torch's dispatcher, never its version),
shape and grid, dtype. Before a kernel serves a device and dtype for the first time in a process it
runs once on a small random layer against the reference (`probe`); a kernel that raises or misses
its tolerance there is skipped from then on, with one warning, so a build without the GPU kernel
falls back cleanly. `load_quantized` calls `prepare_model` once after placing the model and logs the
counts (logger ``signround.kernels``); a layer moved to another device or fed another dtype later is
re-prepared on its next call. Integer kernels have no backward: a call that needs gradients runs
the reference.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import attrs
import torch
from torch import Tensor, nn

from signround.rounding.pack import unpack_cols

if TYPE_CHECKING:  # pragma: no cover
    from signround.adapters.checkpoint.qlinear import QuantLinear

log = logging.getLogger("signround.kernels")

AUTO = "auto"
#: the group sizes torch's int4 kernels take (larger groups are expressed by repeating scales)
INT4_GROUPS = (256, 128, 64, 32)
#: relative Frobenius error of a kernel's output against the float32 reference (spec/format.md)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}


class Unsupported(Exception):
    """A kernel cannot hold this layer's data (raised while repacking; the next kernel is tried)."""


# --------------------------------------------------------------------------------------------- what is asked


@attrs.frozen
class Target:
    """Where and in what dtype a layer runs. capability: the CUDA compute capability (None elsewhere)."""

    device: torch.device = attrs.field(converter=torch.device)
    dtype: torch.dtype
    capability: Optional[tuple[int, int]] = None

    @classmethod
    def of(cls, device: torch.device | str, dtype: torch.dtype) -> "Target":
        device = torch.device(device)
        cap = None
        if device.type == "cuda" and torch.cuda.is_available():
            cap = tuple(torch.cuda.get_device_capability(device))
        return cls(device, dtype, cap)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"


@attrs.frozen
class Geometry:
    """What the choice reads from a layer: its grid and shape (group_size = effective, whole row for -1)."""

    bits: int
    group_size: int
    sym: bool
    in_features: int
    out_features: int
    act_order: bool = False

    @classmethod
    def of(cls, layer: "QuantLinear") -> "Geometry":
        k = layer.in_features
        gs = layer.spec.effective_group_size(k)
        g_idx = layer.g_idx
        act_order = g_idx is not None and not torch.equal(
            g_idx.long().cpu(), torch.arange(k) // gs)
        return cls(layer.spec.bits, gs, layer.spec.sym, k, layer.out_features, act_order)


# --------------------------------------------------------------------------------------------- torch's ops


def _aten(name: str) -> Any:
    """The aten op `name` (tests replace this to simulate a broken kernel)."""
    return getattr(torch.ops.aten, name)


def has_op(name: str, device_type: str) -> bool:
    """Whether torch has op `name` with a kernel for `device_type` (asked of the dispatcher)."""
    try:
        _aten(name)
    except (AttributeError, RuntimeError):
        return False
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", key))
    except (AttributeError, RuntimeError):  # a torch without the query: let the probe decide
        return True


def tinygemm_takes_uint8() -> bool:
    """Whether `_convert_weight_to_int4pack` takes two codes per byte (uint8 [N, K/2], torch ≥ 2.5) rather
    than int32 [N, K]: asked of the op's meta kernel, so it needs no GPU."""
    try:
        _aten("_convert_weight_to_int4pack")(torch.empty(64, 32, dtype=torch.uint8, device="meta"), 2)
        return True
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False


def tinygemm_nibbles(codes: Tensor) -> Tensor:
    """int32 codes [N, K] in 0..15 → uint8 [N, K/2], even k in the high nibble (the tinygemm input)."""
    return ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)


def int4_group(geometry: Geometry) -> Optional[int]:
    """The group size handed to an int4 kernel: the largest of `INT4_GROUPS` dividing both our group size
    and in_features (each of our groups is then a whole number of kernel groups), or None."""
    g = math.gcd(geometry.group_size, geometry.in_features)
    return next((c for c in INT4_GROUPS if g % c == 0), None)


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's innerKTiles: the largest of 8/4/2 with in_features a multiple of 16 · tiles."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def _int4_operands(layer: "QuantLinear", group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """codes int32 [N, K] and scales-and-offsets [K/group, N, 2] (s, s·(8 − z)) in `dtype`."""
    qw = layer.quantized_weight()
    k = layer.in_features
    ours = layer.spec.effective_group_size(k)
    idx = torch.arange(k // group, device=qw.codes.device) * group // ours  # our group of each kernel group
    s = qw.scale.float()[:, idx]
    z = qw.zero.float()[:, idx]
    sz = torch.stack([s.t(), (s * (8.0 - z)).t()], dim=-1).to(dtype).contiguous()
    return qw.codes.to(torch.int32).contiguous(), sz


# --------------------------------------------------------------------------------------------- runners


def _bias(layer: "QuantLinear", dtype: torch.dtype) -> Optional[Tensor]:
    return layer.bias.to(dtype) if layer.bias is not None else None


#: rows above which an int4 layer dequantizes and runs F.linear instead of its kernel on the CPU, where
#: the measured times cross (spec/performance.md "row switch"). One thread: the int4 kernel ~22 µs a row
#: at 1536×576, the dequantization ~2 ms.
WIDE_ROWS = {"cpu": 128}
#: CUDA, from the H200 layer table of 2026-12-02 (spec/perf-h200-2026-12-02c): tinygemm costs ≈ 7.5e-11
#: ms per row per weight, the compiled dequantization + cuBLAS ≈ 0.10 ms + 3.5e-9 ms per weight, so
#: they cross at rows ≈ 47 + 1.33e9 / weights (≈ 70 rows at 14336×4096, 126 at 4096², 610 at 1536²)
CUDA_CROSSOVER = (47, 1.33e9)


def wide_rows(device_type: str, weights: int) -> int:
    """The row count above which a layer of `weights` weights leaves the int4 kernel on `device_type`."""
    if device_type == "cuda":
        base, per_weight = CUDA_CROSSOVER
        return int(base + per_weight / max(weights, 1))
    return WIDE_ROWS.get(device_type, WIDE_ROWS["cpu"])


def dequant_rows(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group: int, zero_offset: int,
                 dtype: torch.dtype) -> Tensor:
    """The weight [N, K] of GPTQ words packed along K (bits 2, 4 or 8: no code straddles a word), as the
    reference computes it: fp32 s · (q − z) cast to `dtype` (one kernel when compiled). Each input
    column's group comes from an index tensor, not from splitting K into (groups, group): with the
    layer dimensions symbolic, a split makes the compiled kernel divide by the group count at every
    element (64-bit division; the H200's layer table showed 0.1-0.6 ms a call)."""
    per = 32 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    n, k = qweight.shape[1], qweight.shape[0] * per
    codes = ((qweight.t().unsqueeze(-1) >> shifts) & mask).reshape(n, k)
    zeros = unpack_cols(qzeros, bits)[:, :n] + zero_offset  # [G, N]
    gidx = torch.arange(k, device=qweight.device) // group
    d = codes.float() - zeros.t().float()[:, gidx]  # exact small integers
    return (d * scales.t().float()[:, gidx]).to(dtype)


def dequant_rows_bytes(qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group: int, zero_offset: int,
                       dtype: torch.dtype) -> Tensor:
    """`dequant_rows` for eager CPU runs, the same values about twice as fast: the codes are read from the
    words' bytes (little-endian: code i of a word is in its byte i·bits/8) and the passes run in place."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    n, k = qweight.shape[1], qweight.shape[0] * (32 // bits)
    b = qweight.t().contiguous().view(torch.uint8)  # [N, K·bits/8]
    if per_byte == 1:
        c = b
    else:
        c = torch.empty(n, b.shape[1], per_byte, dtype=torch.uint8, device=b.device)
        for i in range(per_byte):
            torch.bitwise_and(b >> (i * bits) if i else b, mask, out=c[..., i])
    zeros = unpack_cols(qzeros, bits)[:, :n] + zero_offset  # [G, N]
    d = c.reshape(n, k // group, group).float().sub_(zeros.t().float().unsqueeze(-1))
    return d.mul_(scales.t().float().unsqueeze(-1)).reshape(n, k).to(dtype)


_DEQUANT: dict[str, Callable[..., Tensor]] = {}


def fast_dequant(device_type: str) -> Callable[..., Tensor]:
    """`dequant_rows` compiled for CUDA (one fused kernel instead of a dozen passes), eager elsewhere;
    a compile that fails or differs falls back to eager with one warning (the values are the same).
    (H200, 2026-12-02: a coalesced Wᵀ [K, N] layout and static shapes were no faster over the six
    Llama/Qwen2 layer shapes, spec/performance.md.)"""
    fn = _DEQUANT.get(device_type)
    if fn is None:
        fn = dequant_rows_bytes if sys.byteorder == "little" else dequant_rows
        if device_type == "cuda":
            compiled = torch.compile(dequant_rows, dynamic=None)
            try:
                gen = torch.Generator().manual_seed(0)
                q = torch.randint(-2**31, 2**31 - 1, (16, 64), generator=gen, dtype=torch.int32).cuda()
                z = torch.randint(-2**31, 2**31 - 1, (1, 8), generator=gen, dtype=torch.int32).cuda()
                sc = torch.rand(1, 64, generator=gen).half().cuda()
                if torch.equal(compiled(q, z, sc, 4, 128, 0, torch.bfloat16), dequant_rows(q, z, sc, 4, 128, 0, torch.bfloat16)):
                    fn = compiled
                else:
                    warnings.warn("signround: the compiled dequantization differs from eager; prefill dequantizes eagerly",
                                  stacklevel=2)
            except Exception as err:  # noqa: BLE001 - any compile failure (no triton, no compiler) means eager
                warnings.warn(f"signround: torch.compile of the dequantization failed ({type(err).__name__}); "
                              "prefill dequantizes eagerly", stacklevel=2)
        _DEQUANT[device_type] = fn
    return fn


@attrs.frozen(eq=False)
class WideRun:
    """Many rows: dequantize the layer's words (held weakly) and run `F.linear`, as the reference does."""

    layer: Any  # weakref.ref to the QuantLinear
    dequant: Callable[..., Tensor]
    bits: int
    group: int
    zero_offset: int

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer()
        w = self.dequant(layer.qweight, layer.qzeros, layer.scales, self.bits, self.group, self.zero_offset, x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return nn.functional.linear(x, w, bias)


def wide_run(layer: "QuantLinear", device_type: str) -> Optional[WideRun]:
    """The many-rows path for `layer`, or None where its layout has none (AWQ, 3-bit, act-order, ragged groups)."""
    g = Geometry.of(layer)
    if layer.layout.awq or g.act_order or g.bits not in (2, 4, 8) or g.in_features % g.group_size:
        return None
    return WideRun(weakref.ref(layer), fast_dequant(device_type), g.bits, g.group_size, layer.layout.zero_offset)


@attrs.frozen(eq=False)
class Int4Run:
    """y = x · W (int4 weight-only kernel) + bias; activations cast to `compute` when it differs. Above
    `wide_rows` rows, `wide` runs instead (None: the kernel at every row count)."""

    op: Any
    weight: Tensor
    scales_zeros: Tensor
    group: int
    compute: torch.dtype
    bias: Optional[Tensor]
    wide: Optional[WideRun] = None
    wide_rows: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        if self.wide is not None and x2.shape[0] > self.wide_rows:
            y = self.wide(x2)
            return y if flat else y.reshape(*x.shape[:-1], y.shape[-1])
        if x2.dtype != self.compute:
            x2 = x2.to(self.compute)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self.op(x2, self.weight, self.group, self.scales_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if flat else y.reshape(*x.shape[:-1], y.shape[-1])


@attrs.frozen(eq=False)
class Int8Run:
    """y = (x · Qᵀ) · s + bias with Q = codes − 128 in int8 and one scale per output channel."""

    op: Any
    weight: Tensor
    scales: Tensor
    bias: Optional[Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.op(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])


@attrs.frozen(eq=False)
class DequantRun:
    """The reference: the layer's own `dequant_forward` (held weakly: no reference cycle)."""

    layer: Any  # weakref.ref to the QuantLinear

    def __call__(self, x: Tensor) -> Tensor:
        return self.layer().dequant_forward(x)


# --------------------------------------------------------------------------------------------- the table


@attrs.frozen
class Kernel:
    """One entry of the table. why_not(geometry, target) → None when it can serve, else the reason;
    build(layer, target) → the runner (may raise `Unsupported`). auto_dtypes: the dtypes `auto` picks it
    for (it may serve others when asked by name)."""

    name: str
    device_types: tuple[str, ...]
    ops: tuple[str, ...]
    summary: str
    why_not_fn: Callable[[Geometry, Target], Optional[str]]
    build_fn: Callable[["QuantLinear", Target], Callable[[Tensor], Tensor]]
    auto_dtypes: tuple[torch.dtype, ...]
    probe_bits: int = 4

    def unavailable(self, target: Target) -> Optional[str]:
        """Why this kernel cannot run on `target` at all (device type, torch's ops), or None."""
        if self.device_types and target.device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)}, not {target.device.type}"
        missing = [op for op in self.ops if not has_op(op, target.device.type)]
        if missing:
            return f"this torch has no {target.device.type} kernel for {', '.join(missing)}"
        return None

    def why_not(self, geometry: Geometry, target: Target, *, auto: bool = True) -> Optional[str]:
        reason = self.unavailable(target) or self.why_not_fn(geometry, target)
        if reason is None and auto and target.dtype not in self.auto_dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in self.auto_dtypes)
            reason = (f"chosen for {names} compute only (torch's {target.device.type} kernel for "
                      f"{str(target.dtype).removeprefix('torch.')} is not vectorised: slower than dequantizing "
                      f"from ~8 rows on, see spec/performance.md); load in {names} to use it, or ask for it by name")
        return reason


def _int4_shape(g: Geometry) -> Optional[str]:
    if g.bits != 4:
        return f"{g.bits}-bit weights (4-bit only)"
    if g.act_order:
        return "act-order g_idx (input rows out of group order)"
    if int4_group(g) is None:
        return f"group size {g.group_size} with in_features {g.in_features}: no kernel group of {INT4_GROUPS} divides both"
    return None


def _tinygemm_why_not(g: Geometry, t: Target) -> Optional[str]:
    reason = _int4_shape(g)
    if reason:
        return reason
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"tinygemm computes in bfloat16; {str(t.dtype).removeprefix('torch.')} compute is not cast down"
    if t.capability is not None and t.capability < (8, 0) and torch.version.hip is None:
        return f"needs compute capability 8.0+ (tensor-core bf16), device has {t.capability[0]}.{t.capability[1]}"
    if g.out_features % 8:
        return f"out_features {g.out_features} is not a multiple of 8"
    return None


def _tinygemm_build(layer: "QuantLinear", t: Target) -> Int4Run:
    g = Geometry.of(layer)
    group = int4_group(g)
    assert group is not None
    codes, sz = _int4_operands(layer, group, torch.bfloat16)
    packed_in = tinygemm_nibbles(codes) if tinygemm_takes_uint8() else codes
    weight = _aten("_convert_weight_to_int4pack")(packed_in.contiguous(), inner_k_tiles(g.in_features))
    return Int4Run(_aten("_weight_int4pack_mm"), weight, sz, group, torch.bfloat16, _bias(layer, t.dtype),
                   wide_run(layer, "cuda"), wide_rows("cuda", g.out_features * g.in_features))


def _int4_cpu_why_not(g: Geometry, t: Target) -> Optional[str]:
    return _int4_shape(g)


def _int4_cpu_build(layer: "QuantLinear", t: Target) -> Int4Run:
    group = int4_group(Geometry.of(layer))
    assert group is not None
    codes, sz = _int4_operands(layer, group, t.dtype)
    weight = _aten("_convert_weight_to_int4pack_for_cpu")(codes, 1)  # innerKTiles: unused by the CPU kernel
    return Int4Run(_aten("_weight_int4pack_mm_for_cpu"), weight, sz, group, t.dtype, _bias(layer, t.dtype),
                   wide_run(layer, "cpu"), wide_rows("cpu", layer.out_features * layer.in_features))


def _int8_why_not(g: Geometry, t: Target) -> Optional[str]:
    if g.bits != 8:
        return f"{g.bits}-bit weights (8-bit only)"
    if not g.sym:
        return "asymmetric grid (the kernel has no zero point)"
    if g.group_size != g.in_features:
        return f"group size {g.group_size}: the kernel takes one scale per output channel"
    if g.act_order:
        return "act-order g_idx"
    return None


def _int8_build(layer: "QuantLinear", t: Target) -> Int8Run:
    qw = layer.quantized_weight()
    if not bool((qw.zero == 128).all()):
        raise Unsupported("zero points other than 128 in a symmetric 8-bit layer")
    weight = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    return Int8Run(_aten("_weight_int8pack_mm"), weight, qw.scale[:, 0].to(t.dtype).contiguous(), _bias(layer, t.dtype))


def _dequant_build(layer: "QuantLinear", t: Target) -> DequantRun:
    return DequantRun(weakref.ref(layer))


KERNELS: Mapping[str, Kernel] = {k.name: k for k in (
    Kernel("int4_tinygemm", ("cuda",), ("_weight_int4pack_mm", "_convert_weight_to_int4pack"),
           "torch's CUDA int4 weight-only GEMM (tinygemm), bf16 arithmetic",
           _tinygemm_why_not, _tinygemm_build, (torch.bfloat16, torch.float16)),
    Kernel("int4_cpu", ("cpu",), ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
           "torch's CPU int4 weight-only GEMM", _int4_cpu_why_not, _int4_cpu_build, (torch.bfloat16,)),
    Kernel("int8", ("cpu", "cuda"), ("_weight_int8pack_mm",), "torch's int8 weight-only GEMM, per-channel scales",
           _int8_why_not, _int8_build, (torch.bfloat16,), probe_bits=8),
    Kernel("dequant", (), (), "dequantize + F.linear (the reference)",
           lambda g, t: None, _dequant_build, (torch.float32, torch.bfloat16, torch.float16, torch.float64)),
)}
REFERENCE = "dequant"
KERNEL_NAMES = (AUTO, *KERNELS)


def check_kernel_name(name: str) -> str:
    if name != AUTO and name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {', '.join(KERNEL_NAMES)}")
    return name


# --------------------------------------------------------------------------------------------- the probe

_PROBES: dict[tuple[str, str, torch.dtype], Optional[str]] = {}


def _probe_layer(bits: int, device: torch.device) -> "QuantLinear":
    from signround.adapters.checkpoint.qlinear import QuantLinear
    from signround.rounding import QuantSpec, quantize_weight

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.02
    spec = QuantSpec(bits, 128 if bits == 4 else -1, True)
    return QuantLinear.from_quantized(quantize_weight(w, spec), torch.randn(64, generator=gen) * 0.01,
                                      compute_dtype=torch.float32).to(device)


def relative_error(y: Tensor, ref: Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in float64 (Frobenius)."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_output(layer: "QuantLinear", x: Tensor) -> Tensor:
    """x · dequant(W)ᵀ + b in float32: what every kernel is checked against."""
    w = layer.dequantize(torch.float32)
    bias = layer.bias.float() if layer.bias is not None else None
    return nn.functional.linear(x.float(), w.to(x.device), bias)


def probe(kernel: Kernel, target: Target) -> Optional[str]:
    """Run `kernel` once on a small random layer on `target` against the reference; None when it passes,
    else why not. Cached per process, kernel, device and dtype."""
    key = (kernel.name, str(target.device), target.dtype)
    if key in _PROBES:
        return _PROBES[key]
    reason: Optional[str] = None
    if kernel.name != REFERENCE:
        try:
            layer = _probe_layer(kernel.probe_bits, target.device)
            run = kernel.build_fn(layer, target)
            gen = torch.Generator().manual_seed(1)
            # 3 rows: the kernel; an int4 layer's many-rows path as well (called directly: the probe
            # layer is too small to cross its row switch)
            paths = [(run, 3)] + ([(run.wide, 129)] if getattr(run, "wide", None) is not None else [])
            err = 0.0
            for fn, rows in paths:
                x = torch.randn(rows, layer.in_features, generator=gen).to(target.device, target.dtype)
                err = max(err, relative_error(fn(x), reference_output(layer, x)))
            tol = TOLERANCE.get(target.dtype, 1e-2)
            if not err <= tol:
                reason = f"probe error {err:.2e} exceeds the tolerance {tol:.0e}"
        except (RuntimeError, NotImplementedError, TypeError, ValueError, Unsupported) as err:
            reason = f"probe failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if reason is not None:
            warnings.warn(f"signround: the {kernel.name} kernel is unusable on {target} ({reason}); "
                          "layers fall back to the next kernel", stacklevel=3)
    _PROBES[key] = reason
    return reason


# --------------------------------------------------------------------------------------------- the choice


@attrs.frozen
class Choice:
    """The kernel chosen for one geometry and target, and why each earlier entry was passed over."""

    kernel: str
    skipped: tuple[tuple[str, str], ...] = ()


def select(geometry: Geometry, target: Target, requested: str = AUTO, *, run_probe: bool = True) -> Choice:
    """The first kernel of the table that serves `geometry` on `target` (or the `requested` one, which
    must serve it: a ValueError says why not)."""
    check_kernel_name(requested)
    if requested != AUTO:
        k = KERNELS[requested]
        reason = k.why_not(geometry, target, auto=False) or (probe(k, target) if run_probe else None)
        if reason:
            raise ValueError(f"kernel {requested!r} cannot run this layer on {target}: {reason}")
        return Choice(requested)
    skipped = []
    for k in KERNELS.values():
        reason = k.why_not(geometry, target) or (probe(k, target) if run_probe else None)
        if reason is None:
            return Choice(k.name, tuple(skipped))
        skipped.append((k.name, reason))
    raise AssertionError("the reference kernel serves every layer")  # pragma: no cover


# --------------------------------------------------------------------------------------------- per layer


_SOURCES = ("qweight", "qzeros", "scales", "bias", "g_idx")  # the buffers a runner is built from


def _sources(layer: "QuantLinear") -> tuple[tuple[Any, int], ...]:
    bufs = layer._buffers
    return tuple((weakref.ref(t), t._version) for t in (bufs.get(k) for k in _SOURCES) if t is not None)


@attrs.frozen(eq=False)
class Prepared:
    """A layer's runner for one device and dtype, with what it was built from (so a changed buffer or a
    move is noticed: `fresh`)."""

    kernel: str
    requested: str
    device: torch.device
    dtype: torch.dtype
    run: Callable[[Tensor], Tensor]
    skipped: tuple[tuple[str, str], ...]
    sources: tuple[tuple[Any, int], ...]

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        """Copies and pickles of a model carry no runner: theirs is prepared on first use (a runner holds
        weak references to the original's buffers)."""
        return _unprepared, ()

    def fresh(self, layer: "QuantLinear", x: Tensor) -> bool:
        # Called on every forward: plain dict reads of the buffers (a decode step calls hundreds of
        # layers, and their host time is the step's time on a GPU).
        if x.dtype != self.dtype or x.device != self.device:
            return False
        bufs, sources, i = layer._buffers, self.sources, 0
        for key in _SOURCES:
            t = bufs.get(key)
            if t is None:
                continue
            if i == len(sources):
                return False
            ref, version = sources[i]
            if ref() is not t or t._version != version:
                return False
            i += 1
        return i == len(sources)


def _unprepared() -> None:
    return None


def prepare(layer: "QuantLinear", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            kernel: str = AUTO) -> Prepared:
    """Choose and build `layer`'s kernel for `device` (default: where its words are) and `dtype` (default:
    its compute dtype); the result is kept on the layer (`layer.kernel`) and returned."""
    target = Target.of(device if device is not None else layer.qweight.device, dtype or layer.compute_dtype)
    choice = select(Geometry.of(layer), target, kernel)
    skipped = list(choice.skipped)
    name = choice.kernel
    with torch.no_grad():
        try:
            run = KERNELS[name].build_fn(layer, target)
        except Unsupported as err:
            if kernel != AUTO:
                raise ValueError(f"kernel {kernel!r} cannot run this layer: {err}") from None
            skipped.append((name, str(err)))
            name, run = REFERENCE, _dequant_build(layer, target)
    prepared = Prepared(name, kernel, target.device, target.dtype, run, tuple(skipped), _sources(layer))
    layer.kernel = prepared
    return prepared


def forward(layer: "QuantLinear", x: Tensor) -> Tensor:
    """`QuantLinear.forward`: through the layer's prepared kernel, re-prepared if x's device or dtype (or
    the layer's buffers) changed; the reference when gradients are needed."""
    p = layer.kernel
    if torch.compiler.is_compiling():
        # Traced by torch.compile (a static-cache decode step): the runner chosen at load is traced as
        # it is. The freshness check reads weak references and version counters, which dynamo cannot
        # follow; the compiled graph guards on x's device and dtype itself.
        if p is not None and p.kernel != REFERENCE and p.device == x.device and p.dtype == x.dtype \
                and not (x.requires_grad and torch.is_grad_enabled()):
            return p.run(x)
        return layer.dequant_forward(x)
    if p is None or not p.fresh(layer, x):
        p = prepare(layer, x.device, x.dtype, p.requested if p is not None else AUTO)
    if p.kernel != REFERENCE and x.requires_grad and torch.is_grad_enabled():
        return layer.dequant_forward(x)
    return p.run(x)


# --------------------------------------------------------------------------------------------- per model


@attrs.frozen
class KernelReport:
    """Which kernel each QuantLinear of a model runs, on what."""

    target: str
    layers: Mapping[str, str]
    skipped: Mapping[str, Mapping[str, str]]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.layers.values()))

    def summary(self) -> str:
        counts = ", ".join(f"{k} × {n}" for k, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"QuantLinear kernels on {self.target}: {counts or 'no quantized layers'}"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "counts": self.counts, "layers": dict(self.layers),
                "skipped": {k: dict(v) for k, v in self.skipped.items()}}


def quant_layers(model: nn.Module) -> Iterable[tuple[str, "QuantLinear"]]:
    from signround.adapters.checkpoint.qlinear import QuantLinear

    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def prepare_model(model: nn.Module, kernel: str = AUTO, *, dtype: torch.dtype | None = None) -> KernelReport:
    """Prepare every QuantLinear of `model` where its words lie, in `dtype` (default: each layer's compute
    dtype); logs and returns which kernel each runs."""
    check_kernel_name(kernel)
    layers: dict[str, str] = {}
    skipped: dict[str, dict[str, str]] = {}
    targets = set()
    for name, layer in quant_layers(model):
        p = prepare(layer, None, dtype, kernel)
        layers[name] = p.kernel
        skipped[name] = dict(p.skipped)
        targets.add(f"{p.device}/{str(p.dtype).removeprefix('torch.')}")
    report = KernelReport(", ".join(sorted(targets)) or "-", layers, skipped)
    if layers:
        log.info("%s", report.summary())
        for why in sorted({f"{k}: {r}" for s in skipped.values() for k, r in s.items()}):
            log.info("  passed over %s", why)
    return report


def model_report(model: nn.Module) -> KernelReport:
    """What each QuantLinear runs now (`-` for a layer not prepared yet)."""
    layers, skipped, targets = {}, {}, set()
    for name, layer in quant_layers(model):
        p = layer.kernel
        layers[name] = p.kernel if p is not None else "-"
        skipped[name] = dict(p.skipped) if p is not None else {}
        if p is not None:
            targets.add(f"{p.device}/{str(p.dtype).removeprefix('torch.')}")
    return KernelReport(", ".join(sorted(targets)) or "-", layers, skipped)


# --------------------------------------------------------------------------------------------- for inspect


def runtime_plan(info: Mapping[str, Any], target: Target, act_order: Iterable[str] = ()) -> dict[str, Any]:
    """What `load_quantized` would run for each layer of `signround inspect`'s `info` on `target`
    (probes included). act_order: layers whose stored g_idx is out of group order."""
    act = set(act_order)
    layers: dict[str, Any] = {}
    for name, v in info.get("layers", {}).items():
        if v.get("bits") is None or v.get("in_features") is None:
            layers[name] = {"kernel": None, "skipped": {}, "note": "no grid in the config"}
            continue
        gs = v["group_size"] if v["group_size"] not in (None, -1) and v["group_size"] < v["in_features"] else v["in_features"]
        geo = Geometry(v["bits"], gs, bool(v["sym"]), v["in_features"], v["out_features"], name in act)
        choice = select(geo, target)
        layers[name] = {"kernel": choice.kernel, "skipped": dict(choice.skipped)}
    probes = {k.name: k.unavailable(target) or probe(k, target) or "ok" for k in KERNELS.values()}
    counts = Counter(v["kernel"] for v in layers.values() if v["kernel"])
    return {"target": str(target), "torch": torch.__version__, "capability": target.capability,
            "counts": dict(counts), "kernels_on_target": probes, "layers": layers}


def checkpoint_runtime(path: Any, info: Mapping[str, Any], *, device: Optional[str] = None,
                       dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """`runtime_plan` for the checkpoint at `path` (`info` = its `inspect_checkpoint`): on `device` (default
    cuda when available, else cpu) in `dtype` (default the dtype its config.json declares, else float32,
    as `load_quantized` does). Reads only config.json and the stored g_idx tensors."""
    from pathlib import Path

    import orjson
    from safetensors import safe_open

    p = Path(path)
    if dtype is None:
        cfg = orjson.loads((p / "config.json").read_bytes())
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        dtype = getattr(torch, name.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            dtype = torch.float32
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    act = []
    for shard in sorted(p.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                if not key.endswith(".g_idx"):
                    continue
                layer = key[: -len(".g_idx")]
                v = info.get("layers", {}).get(layer)
                if not v or not v.get("in_features"):
                    continue
                gs = v["group_size"] if v["group_size"] not in (None, -1) else v["in_features"]
                g_idx = fh.get_tensor(key).long()
                if not torch.equal(g_idx, torch.arange(g_idx.numel()) // min(gs, v["in_features"])):
                    act.append(layer)
    return runtime_plan(info, Target.of(dev, dtype), act)


def print_runtime_plan(plan: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"kernels on {plan['target']} (torch {plan['torch']})", show_header=True)
    head.add_column("kernel")
    head.add_column("layers")
    head.add_column("on this machine")
    for name, k in KERNELS.items():
        head.add_row(name, str(plan["counts"].get(name, 0)), plan["kernels_on_target"].get(name, "ok"))
    console.print(head)
    reasons = Counter((k, r) for v in plan["layers"].values() for k, r in v["skipped"].items())
    if reasons:
        table = Table(title="why earlier kernels were passed over")
        for col in ("kernel", "reason", "layers"):
            table.add_column(col)
        for (k, r), n in sorted(reasons.items()):
            table.add_row(k, r, str(n))
        console.print(table)
