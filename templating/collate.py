"""Collate per-sample tensor dicts into one batch: padding, attention masks, variable images; pad
samples to one length across batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from signround.templating.processors import SEQUENCE_KEYS


def _pad_to(t: torch.Tensor, shape: Sequence[int], value: float, left_dim: int | None = None) -> torch.Tensor:
    """Pad `t` with `value` up to `shape`; on `left_dim` the padding goes before the data."""
    pads: list[int] = []
    for d in reversed(range(t.dim())):
        extra = shape[d] - t.shape[d]
        pads += [extra, 0] if d == left_dim else [0, extra]
    return F.pad(t, pads, value=value) if any(pads) else t


def collate(
    samples: Sequence[Mapping[str, torch.Tensor]],
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
    flat_keys: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Batch samples (each with batch dim 1, or 1-D sequences) into one dict of tensors.

    - sequence keys (`input_ids`, `attention_mask`, `token_type_ids`, `cross_attention_mask`, ...)
      are padded on dim 1 to the longest sample, on `padding_side`: `input_ids` with
      `pad_token_id`, `labels` with -100, masks with 0 (so padding is never attended); a
      text-only sample lacking one (e.g. `mm_token_type_ids`, `cross_attention_mask`) gets zeros;
    - `flat_keys` (image-count first dims, e.g. Qwen2-VL `pixel_values`) are concatenated on dim 0
      in sample order; samples without them (text-only) contribute nothing;
    - other tensors (one row per sample, e.g. mllama/idefics3 `pixel_values` [1, n_images, ...])
      are zero-padded in every dim to the largest and concatenated; a sample lacking one gets
      zeros (idefics3/mllama treat all-zero images as padding).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    flat = frozenset(flat_keys)
    rows = [{k: (v.unsqueeze(0) if k in SEQUENCE_KEYS and v.dim() == 1 else v) for k, v in s.items()} for s in samples]
    for i, row in enumerate(rows):
        if "input_ids" not in row:
            raise ValueError(f"sample {i} has no input_ids")
        if row["input_ids"].shape[0] != 1:
            raise ValueError(f"sample {i}: input_ids must have batch dimension 1, got shape {tuple(row['input_ids'].shape)}")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    length = max(row["input_ids"].shape[1] for row in rows)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [row[key] for row in rows if key in row]
        if key in flat:
            out[key] = torch.cat(present, 0)
            continue
        if key in SEQUENCE_KEYS:
            value = pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
            shape = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
            shape[1] = length
            left = 1 if padding_side == "left" else None
            filled = []
            for row in rows:  # a text-only sample may lack e.g. mm_token_type_ids: zeros = "text"
                t = row.get(key)
                if t is None:
                    if key in ("input_ids", "attention_mask"):
                        raise ValueError(f"a sample has no {key!r}")
                    t = torch.zeros([1, row["input_ids"].shape[1], *shape[2:]], dtype=present[0].dtype)
                filled.append(_pad_to(t, shape, value, left))
            out[key] = torch.cat(filled, 0)
            continue
        if any(t.shape[0] != 1 for t in present):  # first dim counts images, not samples
            out[key] = torch.cat(present, 0)
            continue
        shape = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
        ref = present[0]
        filled = [
            _pad_to(row[key], shape, 0) if key in row else torch.zeros(shape, dtype=ref.dtype)
            for row in rows
        ]
        out[key] = torch.cat(filled, 0)
    return out


def pad_samples(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
                padded_keys: Iterable[str] = ()) -> list[dict[str, torch.Tensor]]:
    """Right-pad every sample's sequence tensors to the longest sample, so all batches share one
    length (block inputs are stacked across batches); `input_ids` with `pad_token_id`, `labels`
    with -100, masks with 0, so padding is masked out of the loss.

    Sequence tensors are [L] or [1, L] (padded on the last dim) or [1, L, ...] (padded on dim 1).
    `padded_keys` (Mllama's pixel_values, aspect_ratio_ids/mask, cross_attention_mask) are
    zero-padded in every dim to the largest in the set, and given as zeros to a sample without
    them, so every batch has the same images layout (padded images are masked out by the model).
    """
    longest = max(s["input_ids"].shape[-1] for s in samples)
    shapes = {}
    for k in padded_keys:
        present = [s[k] for s in samples if k in s]
        if present:
            dims = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
            if k in SEQUENCE_KEYS:
                dims[1] = longest
            shapes[k] = (dims, present[0].dtype)
    out = []
    for s in samples:
        extra = longest - s["input_ids"].shape[-1]
        row = {}
        for k, v in s.items():
            if k in shapes:
                v = _pad_to(v, shapes[k][0], 0)
            elif k in SEQUENCE_KEYS and extra:
                value = pad_token_id if k == "input_ids" else (-100 if k == "labels" else 0)
                pads = [0, extra] if v.dim() <= 2 else [0, 0] * (v.dim() - 2) + [0, extra]
                v = F.pad(v, pads, value=value)
            row[k] = v
        for k, (dims, dtype) in shapes.items():
            row.setdefault(k, torch.zeros(dims, dtype=dtype))
        out.append(row)
    return out
