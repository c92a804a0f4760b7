"""Integer codes ↔ int32 words, in the GPTQ layout that `auto_round:auto_gptq` checkpoints use.

Codes are laid end to end as a little-endian bit stream along the packed dimension, 32 bits per
word: the code at position i occupies stream bits [i·bits, (i+1)·bits). For 2/4/8 bits each word
holds 32/bits whole codes (the code of row 32/bits·w + j sits at bit bits·j of word w). For 3 bits
(and 5/6/7) a code may straddle two words: 32 codes fill 3 words, exactly GPTQ's 3-bit layout.

qweight packs codes [in, out] along `in` (dim 0); qzeros packs zero points [groups, out] along
`out` (dim 1).
"""

from __future__ import annotations

from math import gcd

import torch
from torch import Tensor


def _unit(bits: int) -> tuple[int, int]:
    """(codes, words) in the smallest run of codes that fills whole words."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16 for packing, got {bits}")
    g = gcd(32, bits)
    return 32 // g, bits // g


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes [K, N] (values in [0, 2^bits)) along K into int32 words [K·bits/32, N]."""
    n_codes, n_words = _unit(bits)
    rows = codes.shape[0]
    if rows % n_codes:
        raise ValueError(f"cannot pack {rows} rows at {bits} bits: the packed dimension must be a "
                         f"multiple of {n_codes}")
    c = codes.to(torch.int64).reshape(rows // n_codes, n_codes, *codes.shape[1:])
    if int(c.min()) < 0 or int(c.max()) >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
                         f"found [{int(c.min())}, {int(c.max())}]")
    words = torch.zeros(c.shape[0], n_words, *c.shape[2:], dtype=torch.int64, device=codes.device)
    for i in range(n_codes):
        offset = i * bits
        w, shift = divmod(offset, 32)
        words[:, w] |= (c[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, w + 1] |= c[:, i] >> (32 - shift)
    words = words.reshape(-1, *codes.shape[1:])
    # int64 holding unsigned 32-bit values → the same bits as int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: Tensor, bits: int, rows: int | None = None) -> Tensor:
    """Inverse of `pack_rows`: int32 words [K·bits/32, N] → codes [K, N] (int32)."""
    n_codes, n_words = _unit(bits)
    if words.shape[0] % n_words:
        raise ValueError(f"{words.shape[0]} packed rows is not a multiple of {n_words} at {bits} bits")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(words.shape[0] // n_words, n_words, *words.shape[1:])
    mask = 2**bits - 1
    out = []
    for i in range(n_codes):
        offset = i * bits
        k, shift = divmod(offset, 32)
        val = w[:, k] >> shift
        if shift + bits > 32:
            val = val | (w[:, k + 1] << (32 - shift))
        out.append(val & mask)
    codes = torch.stack(out, dim=1).reshape(-1, *words.shape[1:]).to(torch.int32)
    if rows is not None:
        codes = codes[:rows]
    return codes


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Pack codes [G, N] along N into int32 words [G, N·bits/32] (the qzeros layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_cols`."""
    return unpack_rows(words.t(), bits).t().contiguous()
