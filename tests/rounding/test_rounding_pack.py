"""Packing codes into int32 words in the GPTQ layout (rounding/pack.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signround.rounding import pack_cols, pack_rows, unpack_cols, unpack_rows


@given(st.sampled_from([2, 3, 4, 5, 6, 7, 8]), st.integers(1, 3), st.integers(1, 6), st.integers(0, 1000))
@settings(max_examples=80, deadline=None)
def test_pack_unpack_round_trip(bits, units, cols, seed):
    rows = 32 * units
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.int32)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows * bits // 32, cols)
    assert torch.equal(unpack_rows(words, bits), codes)
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits), codes.t())


def test_4bit_layout_by_hand():
    # Column of 8 codes 1..8 → one word, code j at bits 4j: 0x87654321.
    codes = torch.arange(1, 9, dtype=torch.int32).reshape(8, 1)
    assert pack_rows(codes, 4).item() == 0x87654321 - 2**32  # same bits as int32
    # 4-bit sym zero points (8) stored minus one → 7 in every nibble: 0x77777777.
    assert pack_cols(torch.full((1, 8), 7, dtype=torch.int32), 4).item() == 0x77777777


def test_2bit_and_8bit_layout_by_hand():
    codes = torch.tensor([1, 2, 3, 0] * 4, dtype=torch.int32).reshape(16, 1)
    # 2 bits per code, little-endian: 01 10 11 00 repeated → 0b00111001 = 0x39 per byte.
    assert pack_rows(codes, 2).item() == 0x39393939
    codes8 = torch.tensor([0x01, 0x7F, 0x80, 0xFF], dtype=torch.int32).reshape(4, 1)
    assert pack_rows(codes8, 8).item() == 0xFF807F01 - 2**32


def test_3bit_layout_matches_gptq_by_hand():
    # GPTQ's 3-bit layout: codes 0..9 in word 0 bits 0..29, code 10 straddles (2 low bits at 30..31
    # of word 0, its high bit at bit 0 of word 1), codes 11..20 at word 1 bits 1..30, code 21
    # straddles (1 bit at 31, 2 bits at word 2 bits 0..1), codes 22..31 at word 2 bits 2..31.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b101  # low bits 01 → word0 bit30 = 1; high bit 1 → word1 bit0
    codes[21] = 0b110  # low bit 0 → word1 bit31 = 0; high bits 11 → word2 bits 0,1
    codes[31] = 0b111  # word2 bits 29..31
    words = pack_rows(codes, 3).flatten().tolist()
    as_u32 = [w & 0xFFFFFFFF for w in words]
    assert as_u32[0] == 1 << 30
    assert as_u32[1] == 1
    assert as_u32[2] == 0b11 | (0b111 << 29)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_rows(torch.full((8, 1), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of"):
        pack_rows(torch.zeros(12, 1, dtype=torch.int32), 3)
