"""QuantLinear: packing layouts, exact dequantization through the rounding grid, dtype handling."""

from __future__ import annotations

import pytest
import torch

from signround.adapters.checkpoint.formats import AWQ_ORDER, PACKINGS
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.rounding import QuantSpec, QuantizedWeight, quantize_weight

SPECS = [QuantSpec(b, 32, s) for b in (2, 3, 4, 8) for s in (True, False)]


def _weight(out_f: int = 64, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("packing", ["auto_round:auto_gptq", "auto_round", "auto_gptq"])
def test_roundtrip_is_exact(spec: QuantSpec, packing: str) -> None:
    w = _weight()
    qw = quantize_weight(w, spec)
    if PACKINGS[packing].zero_offset and int(qw.zero.min()) == 0:
        pytest.skip("zero point 0 is not representable with zero - 1")
    ql = QuantLinear.from_quantized(qw, torch.randn(64) * 0.01, packing=packing, compute_dtype=torch.float32)
    back = ql.quantized_weight()
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale)
    assert torch.equal(ql.dequantize(torch.float32), qw.dequantize(torch.float32))
    x = torch.randn(3, 5, 128)
    ref = torch.nn.functional.linear(x, qw.dequantize(torch.float32), ql.bias.float())
    torch.testing.assert_close(ql(x), ref, rtol=0, atol=0)


def test_shapes_match_the_reference_example() -> None:
    """Qwen2 1536→1536 at G128, 4-bit (as seen in an auto-round 0.16.1 checkpoint)."""
    qw = quantize_weight(_weight(1536, 1536), QuantSpec(4, 128, True))
    ql = QuantLinear.from_quantized(qw, torch.zeros(1536))
    sd = ql.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "qweight": (torch.int32, (192, 1536)),
        "qzeros": (torch.int32, (12, 192)),
        "scales": (torch.float16, (12, 1536)),
        "bias": (torch.float16, (1536,)),
    }


def _i32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


@pytest.mark.parametrize(("bits", "gptq_word", "native_word"),
                         [(4, 0x77777777, 0x88888888), (2, 0x55555555, 0xAAAAAAAA), (8, 0x7F7F7F7F, 0x80808080)])
def test_sym_qzeros_words(bits: int, gptq_word: int, native_word: int) -> None:
    qw = quantize_weight(_weight(), QuantSpec(bits, 32, True))
    assert bool((QuantLinear.from_quantized(qw).qzeros == _i32(gptq_word)).all())  # zero - 1
    assert bool((QuantLinear.from_quantized(qw, packing="auto_round").qzeros == _i32(native_word)).all())


def test_qweight_word_layout() -> None:
    """Codes 0..7 down rows 0..7 of a column pack into 0x76543210 (lowest bits first)."""
    codes = torch.zeros(32, 128, dtype=torch.int32)  # [out, in]
    codes[0, :8] = torch.arange(8)
    qw = QuantizedWeight(codes=codes, scale=torch.ones(32, 4, dtype=torch.float16),
                         zero=torch.full((32, 4), 8, dtype=torch.int32), spec=QuantSpec(4, 32, True))
    ql = QuantLinear.from_quantized(qw)
    assert int(ql.qweight[0, 0]) == 0x76543210
    assert int(ql.qweight[1, 0]) == 0


def test_awq_layout_reads_interleaved_columns() -> None:
    qw = quantize_weight(_weight(), QuantSpec(4, 32, False))
    ql = QuantLinear.from_quantized(qw, packing="auto_round:auto_awq")
    assert tuple(ql.qweight.shape) == (128, 8) and tuple(ql.qzeros.shape) == (4, 8)
    # slot s of the first word holds output column AWQ_ORDER[s] of input row 0
    word = int(ql.qweight[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * s)) & 0xF for s in range(8)] == [int(qw.codes[c, 0]) for c in AWQ_ORDER]
    assert torch.equal(ql.quantized_weight().codes, qw.codes)


def test_zero_point_zero_refused_in_gptq_v1_layout() -> None:
    w = _weight().abs()  # all positive: asym zero point 0
    qw = quantize_weight(w, QuantSpec(4, 32, False))
    assert int(qw.zero.min()) == 0
    with pytest.raises(ValueError, match="layer blk.q.*zero point of 0"):
        QuantLinear.from_quantized(qw, packing="auto_round:auto_gptq", name="blk.q")
    QuantLinear.from_quantized(qw, packing="auto_round")  # native keeps zp as is


def test_dimensions_must_be_multiples_of_32() -> None:
    qw = quantize_weight(_weight(48, 128), QuantSpec(4, 32, True))
    with pytest.raises(ValueError, match="layer odd: out_features=48"):
        QuantLinear.from_quantized(qw, name="odd")


def test_to_dtype_keeps_packed_buffers() -> None:
    qw = quantize_weight(_weight(), QuantSpec(4, 32, True))
    ql = QuantLinear.from_quantized(qw, torch.ones(64), compute_dtype=torch.bfloat16).to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and ql.bias.dtype == torch.float16 and ql.qweight.dtype == torch.int32
    assert ql.weight.dtype == torch.bfloat16
    assert ql(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_cache_weight_and_act_order_g_idx() -> None:
    qw = quantize_weight(_weight(), QuantSpec(4, 32, True))
    ql = QuantLinear.from_quantized(qw, packing="auto_gptq", compute_dtype=torch.float32)
    assert torch.equal(ql.g_idx, (torch.arange(128) // 32).to(torch.int32))
    ql.cache_weight = True
    x = torch.randn(2, 128)
    y = ql(x)
    assert ql._cached is not None and torch.equal(ql(x), y)
    # act-order checkpoint: row k uses group g_idx[k]
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    ql.g_idx = (perm // 32).to(torch.int32)
    deq = ql.dequantize(torch.float32)
    k = 5
    g = int(perm[k]) // 32
    expected = qw.scale[:, g].float() * (qw.codes[:, k].float() - qw.zero[:, g].float())
    assert torch.equal(deq[:, k], expected)
