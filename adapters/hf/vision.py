"""Vision towers in block-wise tuning: packed towers split into images, Mllama's image slots and
cross-attention states, and the modality-weighted text loss.

Packed towers (Qwen2-VL, Qwen2.5-VL): their block calls split into per-image units.

These blocks take every image's patches of a forward as one sequence `hidden [P, D]`, with
`cu_seqlens` cutting it into the segments attention runs within (one per image and frame, or the
windows of Qwen2.5-VL's window-attention blocks) and per-patch rotary tables
`position_embeddings = (cos, sin)`, each [P, d]. Nothing crosses a segment boundary except through
attention inside a segment, so a unit (the coarsest cut every block of the list shares: an image,
or a frame) is computed exactly the same alone as packed with the others.

`packed_capture` turns the recorded calls into `CapturedInputs` over units: hidden [N, L, D] padded
with zeros to the longest unit L, `loss_mask` [N, L] (1 = a real patch), and per block a
`PackedLayout` whose per-sample inputs are the unit's rotary rows and the block's segment starts.
`PackedLayout.build` packs a mini-batch back into one sequence (each unit's padding is a segment of
its own, so it is never attended by a real patch) and `finish` unpacks the output to [B, L, D].

Mllama: `fold_per_sample` stores its cross-attention states per sample; `image_rows` drops padded
image slots from its vision lists and keeps padded tiles and patches out of their loss.
`ModalityWeights` / `modality_positions`: `loss_weighting="modality"` for the text decoder.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import attrs
import torch
from torch import Tensor

from signround.rounding import BlockInputs

SEQLENS = "cu_seqlens"
MAX_SEQLEN = "max_seqlen"  # recomputed from the packed mini-batch
VALID = "patch_mask"  # per-sample: 1 = a real patch of the unit


def is_packed_call(hidden: Any, kwargs: Mapping[str, Any]) -> bool:
    """A block call of a packed vision tower: 2-D hidden states [P, D] and `cu_seqlens`."""
    return isinstance(hidden, Tensor) and hidden.dim() == 2 and isinstance(kwargs.get(SEQLENS), Tensor)


@attrs.frozen
class PackedLayout:
    """How to call a packed block on a mini-batch of units [B, L, D].

    starts: per-sample key of the block's segment starts [N, L] (bool); per_patch: keyword → key
    (or tuple of keys) of per-patch tensors stored [N, L, ...]; shared: keyword → shared key."""

    starts: str
    per_patch: Mapping[str, Any]
    shared: Mapping[str, str]

    def build(self, inputs: BlockInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        h = inputs.hidden
        b, length = h.shape[:2]
        valid = inputs.per_sample[VALID].bool()
        starts = inputs.per_sample[self.starts].bool()
        # a unit's padding starts a segment of its own: real patches never attend to it
        pad_start = ~valid & torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1)
        marks = (starts | pad_start).reshape(-1)
        marks[::length] = True
        cu = torch.cat([marks.nonzero().flatten(), torch.tensor([b * length], device=h.device)]).to(torch.int32)
        kwargs: dict[str, Any] = {k: inputs.shared[v] for k, v in self.shared.items()}
        for k, v in self.per_patch.items():
            kwargs[k] = _flat(v, inputs)
        kwargs[SEQLENS] = cu
        kwargs[MAX_SEQLEN] = int((cu[1:] - cu[:-1]).max())
        return (h.reshape(b * length, *h.shape[2:]),), kwargs

    def finish(self, output: Tensor, inputs: BlockInputs) -> Tensor:
        """The packed output [B·L, D] as [B, L, D]."""
        return output.reshape(inputs.hidden.shape[0], inputs.hidden.shape[1], *output.shape[1:])


def _flat(spec: Any, inputs: BlockInputs) -> Any:
    if isinstance(spec, tuple):
        return tuple(_flat(s, inputs) for s in spec)
    t = inputs.per_sample[spec]
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _boundaries(cu: Tensor) -> set[int]:
    return {int(x) for x in cu.tolist()}


def _units(records: Sequence[Any]) -> list[tuple[int, int]]:
    """[(start, end)] of the units of one forward: the cuts every block of the list makes."""
    total = records[0][0].shape[0]
    cuts = set.intersection(*(_boundaries(r[2][SEQLENS]) for r in records)) | {0, total}
    points = sorted(c for c in cuts if 0 <= c <= total)
    return [(s, e) for s, e in zip(points, points[1:]) if e > s]


def _pad_rows(rows: list[Tensor], length: int) -> Tensor:
    out = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def packed_capture(prefix: str, records: list[list[Any]], store: Any, dtype: Optional[torch.dtype]) -> Any:
    """CapturedInputs over the per-image units of every batch's packed block calls.

    records: per batch, per block (hidden, extra positionals, kwargs, hidden keyword) as capture
    recorded them. store: capture's `_Store` (where tensors are kept; shared values, checked equal
    across batches). dtype: the hidden states' cache dtype (None = as produced)."""
    from signround.adapters.hf.capture import BlockCall, CapturedInputs, _stored

    def stored(t: Tensor, dt: Optional[torch.dtype] = None) -> Tensor:
        return _stored(t, store.store_device, dt, store.alloc)

    n_blocks = len(records[0])
    units = [_units(rec) for rec in records]  # per batch
    lengths = [e - s for us in units for s, e in us]
    length = max(lengths)
    h = _pad_rows([rec[0][0][s:e] for rec, us in zip(records, units) for s, e in us], length)
    valid = torch.zeros(len(lengths), length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, :n] = True
    per_sample: dict[str, Tensor] = {VALID: stored(valid)}
    memo: dict[tuple[int, ...], Any] = {}
    calls = []
    for b in range(n_blocks):
        per_batch = [rec[b] for rec in records]
        if any(r[1] for r in per_batch):
            raise ValueError(f"{prefix}.{b}: a packed vision block called with extra positional arguments "
                             "cannot be split into images")
        total = [r[0].shape[0] for r in per_batch]
        starts_key = _starts(per_batch, units, length, per_sample, memo, stored)
        per_patch: dict[str, Any] = {}
        shared: dict[str, str] = {}
        for k in per_batch[0][2]:
            if k in (SEQLENS, MAX_SEQLEN):
                continue
            values = [r[2][k] for r in per_batch]
            spec = _per_patch(k, values, total, units, length, per_sample, memo, stored)
            if spec is not None:
                per_patch[k] = spec
            else:
                leaf = store.leaf(k, values)
                if isinstance(leaf, tuple) or leaf.batch_dim is not None:
                    raise ValueError(f"{prefix}.{b}: argument {k!r} of a packed vision block is neither per patch "
                                     "nor the same for every batch")
                shared[k] = leaf.key
        layout = PackedLayout(starts=starts_key, per_patch=per_patch, shared=shared)
        keys = {starts_key, VALID, *[x for v in per_patch.values() for x in (v if isinstance(v, tuple) else (v,))]}
        calls.append(BlockCall(per_sample={k: per_sample[k] for k in keys},
                               shared={v: store.shared[v] for v in shared.values()}, layout=layout))
    hidden = stored(h, dtype)
    mask = valid.to(torch.float32)
    return CapturedInputs(prefix=prefix, hidden=hidden, loss_mask=None if bool(valid.all()) else mask.to(hidden.device),
                          calls=tuple(calls))


def _starts(per_batch: list[Any], units: list[list[tuple[int, int]]], length: int, per_sample: dict[str, Tensor],
            memo: dict[tuple[int, ...], Any], stored: Any) -> str:
    ids = tuple(id(r[2][SEQLENS]) for r in per_batch)
    if ids in memo:
        return memo[ids]
    rows = []
    for r, us in zip(per_batch, units):
        cuts = sorted(_boundaries(r[2][SEQLENS]))
        for s, e in us:
            row = torch.zeros(length, dtype=torch.bool)
            row[[c - s for c in cuts if s <= c < e]] = True
            rows.append(row)
    key = f"segment_starts#{len(memo)}"
    per_sample[key] = stored(torch.stack(rows))
    memo[ids] = key
    return key


def _per_patch(name: str, values: list[Any], total: list[int], units: list[list[tuple[int, int]]], length: int,
               per_sample: dict[str, Tensor], memo: dict[tuple[int, ...], Any], stored: Any) -> Optional[Any]:
    """Keys of a per-patch argument (a tensor, or a tuple of them, whose dim 0 is P) split into
    padded units; None when the argument is not per patch."""
    if all(isinstance(v, (tuple, list)) for v in values) and len({len(v) for v in values}) == 1:
        parts = [_per_patch(f"{name}.{i}", [v[i] for v in values], total, units, length, per_sample, memo, stored)
                 for i in range(len(values[0]))]
        return tuple(parts) if all(p is not None for p in parts) else None
    if not all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == p for v, p in zip(values, total)):
        return None
    ids = tuple(id(v) for v in values)
    if ids in memo:
        return memo[ids]
    rows = [v[s:e] for v, us in zip(values, units) for s, e in us]
    key = f"{name}#{len(memo)}"
    per_sample[key] = stored(_pad_rows(rows, length))
    memo[ids] = key
    return key


# ------------------------------------------------------------------ Mllama: tiles and cross-attention

# Mllama passes its cross-attention states as [B·images·tiles, patches, H] and the layer reads them
# as k_proj(states).view(B, -1, heads, head_dim): stored as that per-sample [B, images·tiles·patches, H].
FOLDED_KWARGS = ("cross_attention_states",)


def fold_per_sample(kwargs: Mapping[str, Any], batch: int, memo: dict[int, Any]) -> dict[str, Any]:
    """`kwargs` with each FOLDED_KWARGS tensor whose dim 0 is a multiple of `batch` regrouped to
    [batch, -1, H] (memo: one regrouped tensor per original, so blocks keep sharing it)."""
    out = dict(kwargs)
    for k in FOLDED_KWARGS:
        v = out.get(k)
        if isinstance(v, Tensor) and v.dim() == 3 and batch and v.shape[0] != batch and v.shape[0] % batch == 0:
            if id(v) not in memo:
                memo[id(v)] = (v, v.reshape(batch, -1, v.shape[-1]))
            out[k] = memo[id(v)][1]
    return out


def _mllama_rows(model: Any, prefix: str, inputs: Mapping[str, Any], hidden: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Mllama's vision layers run one row per image slot [B·images, tiles·padded patches, D]: keep the
    rows of real images (a padded slot has no real tile) and count real tiles' real patches only
    (each tile's patches are padded to a multiple of 8)."""
    ratio = inputs.get("aspect_ratio_mask")
    if not prefix.startswith("model.vision_model.") or not isinstance(ratio, Tensor) or hidden.dim() != 3:
        return None
    tiles = ratio.reshape(-1, ratio.shape[-1]).bool().to(hidden.device)  # [rows, T]
    rows, length = hidden.shape[:2]
    if tiles.shape[0] != rows or length % tiles.shape[1]:
        raise ValueError(f"{prefix}: vision rows {tuple(hidden.shape[:2])} do not match aspect_ratio_mask "
                         f"{tuple(ratio.shape)}")
    per_tile = length // tiles.shape[1]
    real = torch.arange(per_tile, device=hidden.device) < model.model.vision_model.num_patches
    mask = (tiles[:, :, None] & real[None, None, :]).reshape(rows, length)
    return tiles.any(-1), mask


ROW_FILTERS = {"mllama": _mllama_rows}


def image_rows(model: Any, prefix: str, inputs: Mapping[str, Any], hidden: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(rows to keep [R] bool, loss mask [R, L]) of a vision list whose rows include padded image
    slots (Mllama), or None: every row is a sample and every position counts."""
    fn = ROW_FILTERS.get(getattr(getattr(model, "config", None), "model_type", None) or "")
    return None if fn is None else fn(model, prefix, inputs, hidden)


# ------------------------------------------------------------------ modality-weighted block loss


@attrs.frozen
class ModalityWeights:
    """`loss_weighting="modality"`: the text decoder's block loss weights image-token positions by
    `image` and text positions by `text` (a weighted mean: only their ratio matters; MBQ, CVPR 2025)."""

    image: float = 0.5
    text: float = 1.0

    def __attrs_post_init__(self) -> None:
        for name in ("image", "text"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
                raise ValueError(f"modality_weights[{name!r}] must be a finite number >= 0, got {value!r}")
        if self.image == 0 and self.text == 0:
            raise ValueError("modality_weights: image and text cannot both be 0 (no position would count)")


LOSS_WEIGHTINGS = (None, "modality")


def check_loss_weighting(loss_weighting: Optional[str], weights: Optional[Mapping[str, float]] = None,
                         ) -> Optional[ModalityWeights]:
    """The ModalityWeights `loss_weighting="modality"` and `modality_weights={"image": …, "text": …}`
    ask for (None when off); a ValueError names a wrong value or key."""
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be None (off) or 'modality', got {loss_weighting!r}")
    if loss_weighting is None:
        if weights is not None:
            raise ValueError("modality_weights is given but loss_weighting is off; pass loss_weighting='modality'")
        return None
    weights = dict(weights or {})
    unknown = sorted(set(weights) - {"image", "text"})
    if unknown:
        raise ValueError(f"modality_weights: unknown key(s) {unknown}; the keys are 'image' and 'text'")
    return ModalityWeights(**weights)


def image_token_id(model: Any) -> int:
    """The id of the token an image's features replace in the text sequence (config.image_token_id)."""
    cfg = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"loss_weighting='modality' needs the model's image token id (config.image_token_id); "
                     f"{type(model).__name__} has none")


def modality_positions(model: Any, weights: ModalityWeights) -> Any:
    """A function of a calibration batch → [B, L] weights per position (image tokens: weights.image,
    others: weights.text), for capture's `position_weights`."""
    token = image_token_id(model)

    def fn(inputs: Mapping[str, Any]) -> Optional[Tensor]:
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            return None
        return torch.where(ids == token, weights.image, weights.text).to(torch.float32)

    return fn


__all__ = ["FOLDED_KWARGS", "LOSS_WEIGHTINGS", "ModalityWeights", "check_loss_weighting", "image_token_id", "modality_positions", "PackedLayout", "fold_per_sample", "image_rows", "is_packed_call", "packed_capture"]
