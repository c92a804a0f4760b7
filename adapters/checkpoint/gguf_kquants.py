"""SignRound grids as llama.cpp k-quant blocks (Q4_K, Q6_K, Q2_K): pure numpy, one layer at a time.

A k-quant super-block holds 256 weights along K as sub-blocks that share one fp16 `d` (and `dmin`):

| type | SignRound grid | sub-blocks | per sub-block | dequantization (ggml) |
|---|---|---|---|---|
| Q4_K | W4 asym g32 | 8 × 32 | 6-bit sc, 6-bit m | d·sc·q − dmin·m, q 0..15 |
| Q6_K | W6 sym g16 | 16 × 16 | int8 sc | d·sc·(q − 32), q 0..63 |
| Q2_K | W2 asym g16 | 16 × 16 | 4-bit sc, 4-bit m | d·sc·q − dmin·m, q 0..3 |

SignRound's group scale s and zero z are fp16/integer per group, so they do not fit exactly:
s is re-quantized to d·sc (d = fp16(max s / sc_max), sc = round(s / d)), the offset s·z to
dmin·m likewise, then each code is re-rounded to the nearest level of the new grid of
SignRound's own dequantized weight w = s·(q − z). Worked example (Q4_K, two of the 8 groups,
all others at s = 0.01): s = [0.0100, 0.0031], z = [8, 3]: d = fp16(0.01/63) = 1.5873e-4,
sc = [63, 20] → d·sc = [0.0100, 0.00317]; a weight 0.0031·(5 − 3) = 0.0062 becomes code
round((0.0062 + m·dmin) / 0.00317) … and lands 1.5 % off. `KBlocks` reports what changed: the
relative MSE against SignRound's grid and the share of codes re-rounded.
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


def requantize_asym(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, sub: int, scale_bits: int,
                    maxq: int) -> tuple[np.ndarray, ...]:
    """Asymmetric groups (w = s·(q − z), one group per sub-block) -> (d, dmin, sc, m, q, w_new, w).

    codes [N, K] ints, scale / zero [N, K/sub]; every returned array is per super-block
    ([N, K/256] for d/dmin, [N, K/256, 256/sub] for sc/m, [N, K/256, 256/sub, sub] for q and
    the weights)."""
    n, k = codes.shape
    q0 = codes.reshape(n, k // QK_K, QK_K // sub, sub).astype(np.float32)
    s = scale.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    z = zero.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    w = s[..., None] * (q0 - z[..., None])
    top = float(2 ** scale_bits - 1)
    offset = s * z  # the group's minimum is −s·z ≤ 0: k-quants store it as −dmin·m with m ≥ 0
    d = _fp16(s.max(-1) / top)
    dmin = _fp16(offset.max(-1) / top)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s / d[..., None]), 0, top), 0)
        m = np.where(dmin[..., None] > 0, np.clip(np.rint(offset / dmin[..., None]), 0, top), 0)
    step = (d[..., None] * sc)[..., None].astype(np.float32)  # what ggml multiplies by, in float32
    low = (dmin[..., None] * m)[..., None].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.clip(np.rint((w + low) / step), 0, maxq), 0)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8), step * q - low, w, q0


def requantize_sym(codes: np.ndarray, scale: np.ndarray, sub: int, half: int) -> tuple[np.ndarray, ...]:
    """Symmetric groups (w = s·(q − half), s signed) -> (d, sc int8, q, w_new, w), as `requantize_asym`."""
    n, k = codes.shape
    q0 = codes.reshape(n, k // QK_K, QK_K // sub, sub).astype(np.float32)
    s = scale.astype(np.float32).reshape(n, k // QK_K, QK_K // sub)
    w = s[..., None] * (q0 - half)
    d = _fp16(np.abs(s).max(-1) / 127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s / d[..., None]), -127, 127), 0)
    step = (d[..., None] * sc)[..., None].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, np.clip(np.rint(w / step) + half, 0, 2 * half - 1), half)
    return d, sc.astype(np.int8), q.astype(np.uint8), step * (q - half), w, q0


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
