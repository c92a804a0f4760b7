"""SignRound grids as llama.cpp k-quant blocks (Q2_K ... Q6_K): pure numpy, one layer at a time.

A k-quant super-block holds 256 weights along K as sub-blocks that share one fp16 `d` (and `dmin`):

| type | SignRound grid | sub-blocks | per sub-block | dequantization (ggml) |
|---|---|---|---|---|
| Q4_K | W4 asym g32 | 8 × 32 | 6-bit sc, 6-bit m | d·sc·q − dmin·m, q 0..15 |
| Q6_K | W6 sym g16 | 16 × 16 | int8 sc | d·sc·(q − 32), q 0..63 |
| Q2_K | W2 asym g16 | 16 × 16 | 4-bit sc, 4-bit m | d·sc·q − dmin·m, q 0..3 |
| Q3_K | W3 sym g16 | 16 × 16 | 6-bit signed sc (−32..31) | d·sc·(q − 4), q 0..7 |
| Q5_K | W5 asym g32 | 8 × 32 | 6-bit sc, 6-bit m | d·sc·q − dmin·m, q 0..31 |

SignRound's group scale s and zero z are fp16/integer per group, so they do not fit exactly:
s is re-quantized to d·sc (d = fp16(max s / sc_max), sc = round(s / d)), the offset s·z to
dmin·m likewise, each sc / m then moved by ±1 where that serves the sub-block better, and every
code re-rounded to the nearest level of the new grid of SignRound's own dequantized weight
w = s·(q − z). Worked example (Q4_K; a super-block whose 8 groups have s = 0.01, z = 8 but the
second s = 0.0031, z = 3; all its codes 8 but one 5): d = fp16(0.01/63) = 1.588e-4, dmin =
fp16(0.08/63) = 1.270e-3; the second group gets sc = 21, m = 6 (d·sc = 0.003335 for 0.0031, dmin·m =
0.007622 for 0.009298), so its weights 0.0155 (code 8) and 0.0062 (code 5) become codes 7 and 4:
0.01572 and 0.00572. `KBlocks` reports what changed: the relative MSE against SignRound's grid
and the share of codes re-rounded.
"""

from __future__ import annotations

import attrs
import numpy as np

QK_K = 256


@attrs.frozen
class KBlocks:
    """One layer as k-quant blocks, and what re-quantization changed against SignRound's grid.

    blocks: uint8 [N, (K/256)·block_bytes]. dequantized: float32 [N, K], what ggml computes.
    rel_mse: ‖dequantized − w‖² / ‖w‖² with w = SignRound's dequantized weight. codes_changed:
    share of codes that differ from SignRound's (sym: after the shift to the type's offset).
    """

    type_name: str
    blocks: np.ndarray
    dequantized: np.ndarray
    rel_mse: float
    codes_changed: float


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _nearest(w: np.ndarray, step: np.ndarray, low: np.ndarray, lo: int, hi: int, offset: int) -> tuple[np.ndarray, ...]:
    """Codes of the grid step·(q − offset) − low nearest to w, clamped to [lo, hi]; (q, weights, error
    per sub-block). A zero step holds one level: q = offset."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, np.clip(np.rint((w + low) / step) + offset, lo, hi), offset)
    new = step * (q - offset) - low
    return q, new, np.square(new - w).sum(-1)


def _search(w: np.ndarray, d: np.ndarray, dmin: np.ndarray | None, sc: np.ndarray, m: np.ndarray | None,
            sc_range: tuple[int, int], m_top: int, code_range: tuple[int, int], offset: int) -> tuple[np.ndarray, ...]:
    """Per sub-block, the (sc, m) among the rounded ones ±1 whose re-rounded codes land nearest to w."""
    best = None
    for ds in (0, -1, 1):
        for dm in ((0, -1, 1) if m is not None else (0,)):
            sc2 = np.clip(sc + ds, *sc_range)
            m2 = np.clip(m + dm, 0, m_top) if m is not None else None
            step = (d[..., None] * sc2)[..., None].astype(np.float32)  # what ggml multiplies by, in float32
            low = (dmin[..., None] * m2)[..., None].astype(np.float32) if m2 is not None else np.float32(0)
            q, new, err = _nearest(w, step, low, *code_range, offset)
            if best is None:
                best = [sc2, m2, q, new, err]
                continue
            better = err < best[4]
            best = [np.where(better, sc2, best[0]), None if m2 is None else np.where(better, m2, best[1]),
                    np.where(better[..., None], q, best[2]), np.where(better[..., None], new, best[3]),
                    np.where(better, err, best[4])]
    assert best is not None
    return tuple(best[:4])


def requantize_asym(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, sub: int, scale_bits: int,
                    maxq: int) -> tuple[np.ndarray, ...]:
    """Asymmetric groups (w = s·(q − z), one group per sub-block) -> (d, dmin, sc, m, q, w_new, w, q0).

    codes [N, K] ints, scale / zero [N, K/sub]; every returned array is per super-block
    ([N, K/256] for d/dmin, [N, K/256, 256/sub] for sc/m, [N, K/256, 256/sub, sub] for q and
    the weights; q0: SignRound's codes). sc and m are the rounded s/d and s·z/dmin, each moved by
    up to ±1 where that brings the re-rounded sub-block nearer SignRound's weights (it halves the
    added error on weights with outliers)."""
    n, k = codes.shape
    q0 = codes.reshape(n, k // QK_K, QK_K // sub, sub).astype(np.float32)
    s = scale.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    z = zero.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    w = s[..., None] * (q0 - z[..., None])
    top = 2 ** scale_bits - 1
    offset = s * z  # the group's minimum is −s·z ≤ 0: k-quants store it as −dmin·m with m ≥ 0
    d = _fp16(s.max(-1) / top)
    dmin = _fp16(offset.max(-1) / top)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s / d[..., None]), 0, top), 0)
        m = np.where(dmin[..., None] > 0, np.clip(np.rint(offset / dmin[..., None]), 0, top), 0)
    sc, m, q, new = _search(w, d, dmin, sc, m, (0, top), top, (0, maxq), 0)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8), new, w, q0


def requantize_sym(codes: np.ndarray, scale: np.ndarray, sub: int, half: int,
                   sc_range: tuple[int, int] = (-127, 127)) -> tuple[np.ndarray, ...]:
    """Symmetric groups (w = s·(q − half), s signed) -> (d, sc int8, q, w_new, w, q0), as `requantize_asym`.

    sc_range: the signed sub-block scales the type holds (Q6_K int8 −127..127, Q3_K six bits
    −32..31); d = fp16(max |s| / sc_range[1]), so every rounded sc fits before the ±1 search."""
    n, k = codes.shape
    lo, hi = sc_range
    q0 = codes.reshape(n, k // QK_K, QK_K // sub, sub).astype(np.float32)
    s = scale.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    w = s[..., None] * (q0 - half)
    d = _fp16(np.abs(s).max(-1) / float(hi))
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s / d[..., None]), lo, hi), 0)
    sc, _, q, new = _search(w, d, None, sc, None, sc_range, 0, (0, 2 * half - 1), half)
    return d, sc.astype(np.int8), q.astype(np.uint8), new, w, q0


def _pack_bits(q: np.ndarray, rows: int, width: int) -> np.ndarray:
    """q [..., rows·L] values < 2^width -> [..., L] bytes: row r at bits width·r (rows·width = 8)."""
    parts = q.reshape(*q.shape[:-1], rows, -1).astype(np.uint8)
    out = np.zeros(parts.shape[:-2] + parts.shape[-1:], np.uint8)
    for r in range(rows):
        out |= parts[..., r, :] << np.uint8(width * r)
    return out


def _q4_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> ggml's 12 bytes (`get_scale_min_k4` reads them back)."""
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def _report(type_name: str, blocks: np.ndarray, new: np.ndarray, w: np.ndarray, changed: np.ndarray) -> KBlocks:
    n = blocks.shape[0]
    norm = float(np.square(w, dtype=np.float64).sum())
    err = float(np.square(new - w, dtype=np.float64).sum())
    return KBlocks(type_name, blocks.reshape(n, -1), new.reshape(n, -1).astype(np.float32),
                   err / norm if norm > 0 else 0.0, float(changed.mean()))


def encode_q4_k(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> KBlocks:
    """W4 asym g32 -> Q4_K blocks (144 bytes: d, dmin, 12 scale bytes, 128 nibble bytes)."""
    d, dmin, sc, m, q, new, w, q0 = requantize_asym(codes, scale, zero, 32, 6, 15)
    # nibbles: byte l of pair j holds sub-block 2j (low) and 2j+1 (high), element l
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(*q.shape[:2], 128)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _q4_k_scales(sc, m), qs], axis=-1)
    return _report("q4_k", blocks, new, w, q != q0)


def encode_q2_k(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> KBlocks:
    """W2 asym g16 -> Q2_K blocks (84 bytes: 16 bytes sc | m << 4, 64 bytes of 2-bit codes, d, dmin)."""
    d, dmin, sc, m, q, new, w, q0 = requantize_asym(codes, scale, zero, 16, 4, 3)
    flat = q.reshape(*q.shape[:2], 2, 4, 32)  # element h·128 + r·32 + l sits in byte h·32 + l, bits 2r
    qs = _pack_bits(flat.reshape(*q.shape[:2], 2, 128), 4, 2).reshape(*q.shape[:2], 64)
    blocks = np.concatenate([sc | (m << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return _report("q2_k", blocks, new, w, q != q0)


def encode_q6_k(codes: np.ndarray, scale: np.ndarray) -> KBlocks:
    """W6 sym g16 -> Q6_K blocks (210 bytes: 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 sc, d)."""
    d, sc, q, new, w, q0 = requantize_sym(codes, scale, 16, 32)
    flat = q.reshape(*q.shape[:2], 2, 128)  # two halves of 128 weights
    ql = _pack_bits(flat & 15, 2, 4)  # half h: byte l holds elements l (low) and 64 + l (high)
    qh = _pack_bits(flat >> 4, 4, 2)  # half h: byte l holds bits 4-5 of elements l + 32·r at bits 2r
    blocks = np.concatenate([ql.reshape(*q.shape[:2], 128), qh.reshape(*q.shape[:2], 64),
                             sc.view(np.uint8), _f16_bytes(d)], axis=-1)
    return _report("q6_k", blocks, new, w, q != q0)


def encode_q3_k(codes: np.ndarray, scale: np.ndarray) -> KBlocks:
    """W3 sym g16 -> Q3_K blocks (110 bytes: 32 bytes of high bits, 64 bytes of 2-bit codes, 12 scale
    bytes, d). ggml: w = d·(u − 32)·(q − 4) with u the stored six-bit scale, q = low 2 bits + 4·high bit."""
    d, sc, q, new, w, q0 = requantize_sym(codes, scale, 16, 4, (-32, 31))
    flat = q.reshape(*q.shape[:2], 256)
    hmask = _pack_bits(flat >> 2, 8, 1)  # element 32·j + l: bit j of byte l
    qs = _pack_bits((flat & 3).reshape(*q.shape[:2], 2, 128), 4, 2).reshape(*q.shape[:2], 64)  # as Q2_K
    u = (sc.astype(np.int16) + 32).astype(np.uint8)  # 0..63
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)  # byte i: scale i (low nibble), i + 8 (high)
    high = _pack_bits(u >> 4, 4, 2)  # byte 8 + k: bits 4-5 of scale 4·j + k at bits 2·j
    blocks = np.concatenate([hmask, qs, low, high, _f16_bytes(d)], axis=-1)
    return _report("q3_k", blocks, new, w, q != q0)


def encode_q5_k(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> KBlocks:
    """W5 asym g32 -> Q5_K blocks (176 bytes: d, dmin, 12 scale bytes as Q4_K, 32 bytes of high bits,
    128 low-nibble bytes as Q4_K)."""
    d, dmin, sc, m, q, new, w, q0 = requantize_asym(codes, scale, zero, 32, 6, 31)
    qh = _pack_bits((q >> 4).reshape(*q.shape[:2], 256), 8, 1)  # sub-block j, element l: bit j of byte l
    low = q & 15
    qs = (low[..., 0::2, :] | (low[..., 1::2, :] << 4)).reshape(*q.shape[:2], 128)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _q4_k_scales(sc, m), qh, qs], axis=-1)
    return _report("q5_k", blocks, new, w, q != q0)
