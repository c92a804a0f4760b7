"""`QuantLinear`: a Linear layer stored as packed integer codes, dequantized in pure torch.

The tensor layout is one of the packings of `formats.PACKINGS` (spec/format.md): GPTQ words packed
along the input dimension with the zero point stored as z − 1 (GPTQ v1) or as is, with or without
a ``g_idx``; or AWQ's 4-bit layout, packed along the output dimension with interleaved columns.

Dequantization goes through `rounding` (unpack_rows/unpack_cols, `QuantizedWeight.dequantize`):
the same grid the tuner and the exporter use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from signround.adapters.checkpoint import kernels
from signround.adapters.checkpoint.formats import AWQ_ORDER, AWQ_SLOT, SYM_PACKING, Packing, get_packing
from signround.rounding.grid import QuantizedWeight, dequantize_weight
from signround.rounding.pack import pack_cols, pack_rows, unpack_cols, unpack_rows
from signround.rounding.spec import QuantSpec


def _awq_reorder(x: Tensor, order: tuple[int, ...]) -> Tensor:
    """Permute each run of 8 columns of x [R, N] by `order`."""
    rows, cols = x.shape
    return x.reshape(rows, cols // 8, 8)[..., list(order)].reshape(rows, cols)


class QuantLinear(nn.Module):
    """y = x · dequant(qweight, qzeros, scales)ᵀ + bias.

    Buffers (all persistent, named as in checkpoints): ``qweight`` int32 [K·bits/32, N] (AWQ: [K, N·bits/32]),
    ``qzeros`` int32 [G, N·bits/32], ``scales`` fp16 [G, N], ``bias`` fp16 [N] (if any),
    ``g_idx`` int32 [K] (auto_gptq only). `compute_dtype` is the dtype `weight` is dequantized to
    when no input dtype is at hand. With `cache_weight` the dequantized weight is kept after the
    first forward (faster, costs a full-precision copy).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool,
        packing: str | Packing = SYM_PACKING.name,
        compute_dtype: torch.dtype = torch.float16,
        cache_weight: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        layout = get_packing(packing)
        layout.check_bits(spec.bits)
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.layout = layout
        self.packing = layout.name
        self.compute_dtype = compute_dtype
        self.cache_weight = cache_weight
        bits = spec.bits
        groups = spec.num_groups(in_features)
        kw = {"device": device}
        qshape = layout.qweight_shape(in_features, out_features, bits)
        self.register_buffer("qweight", torch.zeros(*qshape, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, -(-out_features * bits // 32), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, **kw))
        if layout.has_g_idx:
            gs = spec.effective_group_size(in_features)
            self.register_buffer("g_idx", (torch.arange(in_features, device=device) // gs).to(torch.int32))
        else:  # registered as absent, so a later assignment is a buffer the kernel sees change
            self.register_buffer("g_idx", None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, **kw))
        else:
            self.register_buffer("bias", None)
        self._cached: Tensor | None = None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Tensor | None = None,
        *,
        packing: str | Packing = SYM_PACKING.name,
        compute_dtype: torch.dtype = torch.float16,
        name: str = "",
    ) -> "QuantLinear":
        """Pack a `QuantizedWeight` (codes [out, in], scale/zero [out, groups]) into a new layer."""
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.spec, bias=bias is not None, packing=packing,
                    compute_dtype=compute_dtype, device=qw.codes.device)
        zeros = qw.zero.to(torch.int64) - layer.layout.zero_offset
        if layer.layout.zero_offset and int(zeros.min()) < 0:
            raise ValueError(
                f"layer {name or '<unnamed>'}: a zero point of 0 cannot be stored in the {layer.packing!r} layout "
                "(it stores zero - 1, GPTQ v1); use format 'auto_round' (native packing) for asymmetric weights"
            )
        bits = qw.spec.bits
        for what, size, unit in (("in_features", in_features, 32), ("out_features", out_features, 32)):
            if size % unit:
                raise ValueError(f"layer {name or '<unnamed>'}: {what}={size} is not a multiple of {unit}; "
                                 f"{bits}-bit packing needs both dimensions divisible by 32 — keep it in full precision")
        if layer.layout.awq:
            layer.qweight = pack_cols(_awq_reorder(qw.codes.t().contiguous(), AWQ_ORDER), bits)
            layer.qzeros = pack_cols(_awq_reorder(zeros.t().contiguous(), AWQ_ORDER), bits)
        else:
            layer.qweight = pack_rows(qw.codes.t().contiguous(), bits)
            layer.qzeros = pack_cols(zeros.t().contiguous(), bits)
        layer.scales = qw.scale.t().contiguous().to(torch.float16)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        """Unpack to codes [out, in], scale [out, groups] (fp16), zero [out, groups] (int32)."""
        codes, scale, zero = self._unpacked()
        return QuantizedWeight(codes=codes, scale=scale, zero=zero, spec=self.spec)

    def _unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        bits = self.spec.bits
        if self.layout.awq:
            codes = _awq_reorder(unpack_cols(self.qweight, bits), AWQ_SLOT).t()
            zeros = _awq_reorder(unpack_cols(self.qzeros, bits), AWQ_SLOT)
        else:
            codes = unpack_rows(self.qweight, bits, self.in_features).t()
            zeros = unpack_cols(self.qzeros, bits)[:, : self.out_features] + self.layout.zero_offset
        return codes.contiguous(), self.scales.t().contiguous(), zeros.t().contiguous()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Full-precision weight [out, in] in `dtype` (default `compute_dtype`)."""
        dtype = dtype or self.compute_dtype
        gs = self.spec.effective_group_size(self.in_features)
        g_idx = self.g_idx
        # Under torch.compile the order test (data-dependent) is not traced: the per-column path gives the
        # same values for an in-order g_idx too, only slower.
        if g_idx is not None and (torch.compiler.is_compiling() or not torch.equal(
                g_idx.long(), torch.arange(self.in_features, device=g_idx.device) // gs)):
            return self._dequantize_g_idx(dtype)
        codes, scale, zero = self._unpacked()
        return dequantize_weight(codes, scale, zero, self.spec, dtype)

    def _dequantize_g_idx(self, dtype: torch.dtype) -> Tensor:
        """Act-order GPTQ checkpoints: input row k uses group g_idx[k]."""
        codes, scale, zero = self._unpacked()
        idx = self.g_idx.long()
        return (scale.float()[:, idx] * (codes.float() - zero.float()[:, idx])).to(dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (for code that reads `.weight.dtype` / `.weight.device`)."""
        return self.dequantize(self.compute_dtype)

    #: the `kernels.Prepared` runner this layer goes through (chosen at load by `kernels.prepare_model`,
    #: else on the first call); None until then
    kernel = None

    def forward(self, x: Tensor) -> Tensor:
        """Through the kernel chosen for x's device and dtype (`kernels.py`); `dequant_forward` when none fits."""
        return kernels.forward(self, x)

    def dequant_forward(self, x: Tensor) -> Tensor:
        """The reference: dequantize (kept with `cache_weight`), then `F.linear`."""
        w = self._cached
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantize(x.dtype)
            if self.cache_weight:
                self._cached = w
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, w, bias)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        """Move buffers like any module, but keep their dtypes: `model.to(torch.bfloat16)` must not
        round the fp16 scales (the checkpoint's values are the grid)."""
        self._cached = None
        before = {k: b for k, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new is not None and new.dtype != old.dtype:
                self._buffers[key] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, packing={self.packing!r}, bias={self.bias is not None}")
