"""Record what each block of a block list is called with, by running calibration batches.

Every block of the list gets a recording stand-in for its `forward` that stores its arguments and
passes the hidden states through unchanged (so the model's loop is cheap); after the last block
the forward is stopped with a private exception. Block 0's hidden states are the calibration
inputs; every block's other arguments (attention masks, position ids / position_embeddings,
Qwen2-VL multimodal rope ids, cache_position…) are kept per block, because families such as
Gemma-3 pass different masks and rotary tables to sliding and full-attention layers.

Splitting rule (nothing model-specific): a tensor argument with a dimension of the batch's size
(the first such dimension; ndim >= 2) is per sample unless it is the same for every sample of
every batch, in which case it is stored once (narrowed to size 1 on that dimension so it
broadcasts over any mini-batch). Everything else must be equal across batches and is shared.
Blocks the model never called (Mllama's cross-attention layers on text-only input) get no call.
Packed vision towers (Qwen2-VL's hidden states [patches, D] with `cu_seqlens`) are split into one
sample per image instead (`hf/vision.py`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import contextlib

import attrs
import torch
from torch import Tensor, nn

from signround.adapters.hf.blocks import blocks_of, is_vision_name
from signround.adapters.hf.placement import on_device
from signround.adapters.hf.vision import fold_per_sample, image_rows, is_packed_call, packed_capture
from signround.rounding import BlockInputs

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover
    Cache = ()  # type: ignore[assignment,misc]

DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")
ARG_PREFIX = "__arg"  # extra positional arguments are stored under __arg1, __arg2, …

Batch = Union[Mapping[str, Any], Tensor]
#: allocates an uninitialised tensor where the cache lives: alloc(shape, dtype)
Alloc = Callable[[tuple[int, ...], torch.dtype], Tensor]


class _StopForward(Exception):
    """Raised after the last block of the list has been recorded: the rest of the model is skipped."""


class _MixedMasks(Exception):
    """A mask argument is None in some batches (SDPA's implicit causal mask) and a tensor in others."""


@contextlib.contextmanager
def _materialized_masks() -> Iterator[None]:
    """Make transformers build explicit attention masks even where SDPA could use `is_causal`.

    Without padding, transformers passes `attention_mask=None` and lets SDPA apply the causal mask
    implicitly; with padding it passes a tensor. When calibration batches mix both, no single
    stored layout is right for all samples, so capture runs again with every mask explicit.
    """
    try:
        import transformers.masking_utils as masking
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(masking, "_ignore_causal_mask_sdpa", None)
    if original is None:  # pragma: no cover - other transformers versions
        yield
        return
    masking._ignore_causal_mask_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        masking._ignore_causal_mask_sdpa = original


@attrs.frozen
class Leaf:
    """One stored argument: its key in BlockInputs, and the dim its sample axis goes back to
    (None = shared, passed as stored)."""

    key: str
    batch_dim: Optional[int] = None


@attrs.frozen
class CallLayout:
    """How to rebuild a block call from BlockInputs: hidden states first (positionally or as the
    `hidden_kwarg` keyword), extra positionals in order, then keywords (a Leaf, or a tuple of Leafs
    for tuple values such as position_embeddings = (cos, sin))."""

    hidden_kwarg: Optional[str]
    positional: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def build(self, inputs: BlockInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) for the block, from a (mini-batch of) BlockInputs."""
        kwargs = {k: _value(s, inputs) for k, s in self.kwargs.items()}
        if self.hidden_kwarg is not None:
            kwargs[self.hidden_kwarg] = inputs.hidden
            return tuple(_value(s, inputs) for s in self.positional), kwargs
        return (inputs.hidden, *(_value(s, inputs) for s in self.positional)), kwargs

    def finish(self, output: Tensor, inputs: BlockInputs) -> Tensor:
        """The block's output as the samples' rows (as it is: one row per sample already)."""
        return output


def _value(spec: Any, inputs: BlockInputs) -> Any:
    """One argument rebuilt from its Leaf (or tuple of Leafs). A module-level function on purpose:
    a recursive closure is a reference cycle that would keep every mini-batch's tensors (on the
    GPU) alive until Python's cyclic collector runs."""
    if isinstance(spec, tuple):
        return tuple(_value(s, inputs) for s in spec)
    if spec.batch_dim is None:
        return inputs.shared[spec.key]
    return inputs.per_sample[spec.key].movedim(0, spec.batch_dim)


@attrs.frozen
class BlockCall:
    """The non-hidden arguments one block receives: per-sample tensors [N, ...], shared values, layout."""

    per_sample: Mapping[str, Tensor]
    shared: Mapping[str, Any]
    layout: Any  # CallLayout, or vision.PackedLayout for a packed vision tower


@attrs.frozen
class CapturedInputs:
    """Calibration inputs of a block list.

    hidden: [N, ...] inputs of block 0; loss_mask: [N, L] (0 = padding) or None;
    calls: per block, its arguments (None = the model never called it on this data).
    """

    prefix: str
    hidden: Tensor
    loss_mask: Optional[Tensor]
    calls: tuple[Optional[BlockCall], ...]

    @property
    def num_samples(self) -> int:
        return self.hidden.shape[0]

    def block_inputs(self, index: int, hidden: Optional[Tensor] = None) -> BlockInputs:
        """BlockInputs of block `index`, with `hidden` (default: block 0's captured inputs)."""
        call = self.calls[index]
        if call is None:
            raise ValueError(f"block {self.prefix}.{index} was not called by the model on the calibration data")
        return BlockInputs(hidden=self.hidden if hidden is None else hidden, per_sample=dict(call.per_sample),
                           shared=dict(call.shared), loss_mask=self.loss_mask)


def _input_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    p = emb.weight if emb is not None and hasattr(emb, "weight") else next(model.parameters())
    return p.device, p.dtype


def _to_model(batch: Batch, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    items = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    out = {}
    for k, v in items.items():
        if isinstance(v, Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _batch_dim(t: Tensor, batch: int) -> Optional[int]:
    """First dim of size `batch` (ndim >= 2); a tensor whose dim 0 is 1 while batch > 1 is
    broadcast over the batch and has none."""
    if t.dim() < 2 or (batch > 1 and t.shape[0] == 1):
        return None
    return next((d for d, s in enumerate(t.shape) if s == batch), None)


def _common_batch_dim(values: list[Tensor], sizes: list[int]) -> Optional[int]:
    """The sample axis shared by all batches, decided by batches of more than one sample when any."""
    multi = [(v, n) for v, n in zip(values, sizes) if n > 1] or list(zip(values, sizes))
    dims = {_batch_dim(v, n) for v, n in multi}
    if len(dims) != 1:
        return None
    dim = dims.pop()
    if dim is None or any(v.dim() <= dim or v.shape[dim] != n for v, n in zip(values, sizes)):
        return None
    return dim


def _same(values: list[Any]) -> bool:
    first = values[0]
    for v in values[1:]:
        if v is first:
            continue
        if isinstance(first, Tensor) and isinstance(v, Tensor):
            if v.shape != first.shape or v.dtype != first.dtype or not torch.equal(v.to(first.device), first):
                return False
        elif isinstance(first, Tensor) or isinstance(v, Tensor) or not (v == first):
            return False
    return True


class _Store:
    """Turns per-batch argument values into stored leaves, sharing work across blocks by identity."""

    def __init__(self, sizes: list[int], store_device: Optional[torch.device], shared_device: Optional[torch.device],
                 alloc: Optional[Alloc] = None):
        self.sizes = sizes
        self.store_device = store_device
        self.alloc = alloc
        self.shared_device = shared_device
        self.per_sample: dict[str, Tensor] = {}
        self.shared: dict[str, Any] = {}
        self.memo: dict[tuple[int, ...], Leaf] = {}
        self.count = 0

    def leaf(self, name: str, values: list[Any]) -> Any:
        if all(isinstance(v, (tuple, list)) for v in values) and len({len(v) for v in values}) == 1:
            return tuple(self.leaf(f"{name}.{i}", [v[i] for v in values]) for i in range(len(values[0])))
        ids = tuple(id(v) for v in values)
        if ids in self.memo:
            return self.memo[ids]
        self.count += 1
        key = f"{name}#{self.count}"
        leaf = self._store(name, key, values)
        self.memo[ids] = leaf
        return leaf

    def _store(self, name: str, key: str, values: list[Any]) -> Leaf:
        if not all(isinstance(v, Tensor) for v in values):
            if "mask" in name and any(isinstance(v, Tensor) for v in values):
                raise _MixedMasks(name)
            if not _same(values):
                raise ValueError(f"block argument {name!r} differs between calibration batches and is not a "
                                 "tensor with a batch dimension, so it cannot be split per sample")
            self.shared[key] = values[0]
            return Leaf(key)
        dim = _common_batch_dim(values, self.sizes)
        if dim is None:
            if not _same(values):
                raise ValueError(f"block argument {name!r} differs between calibration batches but has no "
                                 f"batch dimension (shapes {[tuple(v.shape) for v in values]})")
            self.shared[key] = values[0].to(self.shared_device) if self.shared_device else values[0]
            return Leaf(key)
        rows = [v.narrow(dim, i, 1) for v, n in zip(values, self.sizes) for i in range(n)]
        if _same(rows):
            self.shared[key] = rows[0].to(self.shared_device) if self.shared_device else rows[0]
            return Leaf(key)
        try:
            stacked = torch.cat([v.movedim(dim, 0) for v in values], dim=0)
        except RuntimeError as err:
            raise ValueError(f"block argument {name!r} has different shapes across calibration batches "
                             f"({[tuple(v.shape) for v in values]}); pad every batch to the same seqlen") from err
        self.per_sample[key] = _stored(stacked, self.store_device, alloc=self.alloc)
        return Leaf(key, dim)


def _stored(t: Tensor, device: Optional[torch.device], dtype: Optional[torch.dtype] = None,
            alloc: Optional[Alloc] = None) -> Tensor:
    """`t` where the cache lives: from `alloc` when given (the engine's placement: pinned host
    memory, the device, a memory-mapped file), else in page-locked memory when that is the host and
    a GPU is present, so that the engine's row copies to the GPU are asynchronous."""
    device = device or t.device
    dtype = dtype or t.dtype
    if alloc is not None:
        return alloc(tuple(t.shape), dtype).copy_(t)
    if device.type == "cpu" and torch.cuda.is_available():
        out = torch.empty(t.shape, dtype=dtype, device=device, pin_memory=True)
        return out.copy_(t)
    return t.to(device=device, dtype=dtype)


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: Iterable[Batch], prefix: str, *, nsamples: Optional[int] = None,
                   store_device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
                   shared_device: Optional[torch.device | str] = None, alloc: Optional[Alloc] = None,
                   position_weights: Optional[Callable[[Mapping[str, Any]], Optional[Tensor]]] = None) -> CapturedInputs:
    """Run `batches` (dicts of model inputs, or input_ids tensors) through `model` and record the
    arguments of every block in the list at `prefix`, until `nsamples` samples are collected.

    store_device/dtype: where and in which dtype hidden states and per-sample arguments are kept
    (default: as produced). shared_device: where shared tensors are kept (default: as produced).
    alloc: allocates the stored tensors (the engine's cache placement; default: on store_device).
    position_weights: batch → [B, L] loss weights per position (`vision.modality_positions`),
    multiplied into the loss mask (padding stays 0).
    A vision block list's samples are the images (a batch of text-only samples adds none; a packed
    tower keeps every image of the batches that reach `nsamples` text samples).
    The model runs with use_cache=False; blocks do no work during capture.
    """
    batches = list(batches)
    try:
        return _capture(model, batches, prefix, nsamples, store_device, dtype, shared_device, alloc, position_weights)
    except _MixedMasks:
        with _materialized_masks():
            return _capture(model, batches, prefix, nsamples, store_device, dtype, shared_device, alloc,
                            position_weights)


def _capture(model: nn.Module, batches: list[Batch], prefix: str, nsamples: Optional[int], store_device: Any,
             dtype: Optional[torch.dtype], shared_device: Any, alloc: Optional[Alloc] = None,
             position_weights: Optional[Callable[[Mapping[str, Any]], Optional[Tensor]]] = None) -> CapturedInputs:
    blocks = blocks_of(model, prefix)
    device, model_dtype = _input_device_dtype(model)
    records: list[list[Any]] = []
    hidden: list[Tensor] = []
    masks: list[Optional[Tensor]] = []
    current: list[Any] = []  # per block: (hidden, extra args, kwargs, hidden keyword) of this batch
    folded: dict[int, Any] = {}  # this batch's regrouped per-sample arguments (vision.fold_per_sample)
    output_template: list[Any] = []
    last = len(blocks) - 1

    def recorder(index: int, block: nn.Module):
        original = type(block).forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            kwargs = {k: v for k, v in kwargs.items()
                      if k not in DROPPED_KWARGS and not (Cache and isinstance(v, Cache))}
            hidden_kwarg = None if args else "hidden_states"
            h = args[0] if args else kwargs[hidden_kwarg]
            stored = fold_per_sample({k: v for k, v in kwargs.items() if k != hidden_kwarg}, h.shape[0], folded)
            current[index] = (h, args[1:], stored, hidden_kwarg)
            if index == 0 and not output_template:  # learn the block's output structure once
                # The block may still sit on the CPU while inputs live on the accelerator (blocks
                # move to the device one at a time): run this one call where the inputs are.
                with on_device(block, h.device):
                    output_template.append(original(block, *args, **kwargs))
            if index == last:
                raise _StopForward
            template = output_template[0]
            return (h, *template[1:]) if isinstance(template, tuple) else h

        return forward

    collected = 0
    # A forward already set on the instance (accelerate's device_map hooks wrap it so) comes back after.
    own_forward = [block.__dict__.get("forward") for block in blocks]
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i, block)
        for batch in batches:
            if nsamples is not None and collected >= nsamples:
                break
            current[:] = [None] * len(blocks)
            folded.clear()
            inputs = _to_model(batch, device, model_dtype)
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if current[0] is None:
                if is_vision_name(prefix):
                    continue  # a batch of text-only samples: nothing for the vision blocks
                raise RuntimeError(f"the model never called the first block of {prefix!r} on this batch")
            h = current[0][0]
            mask = inputs.get("attention_mask")
            mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(h.shape[:2]) \
                else None
            rows = image_rows(model, prefix, inputs, h)
            if rows is not None:  # padded image slots (Mllama) are no samples; padded tiles/patches no loss
                keep, mask = rows
                if not bool(keep.any()):
                    continue
                current[:] = _keep_rows(current, keep, h.shape[0])
                mask, h = mask[keep], current[0][0]
            weights = None if position_weights is None else position_weights(inputs)
            if weights is not None and h.dim() >= 2 and tuple(weights.shape) == tuple(h.shape[:2]):
                mask = weights.to(h.device) if mask is None else mask.to(weights.dtype) * weights.to(mask.device)
            hidden.append(h)
            masks.append(mask)
            records.append(list(current))
            # a packed vision tower's hidden states are [patches, D]: count the batch's samples
            collected += inputs["input_ids"].shape[0] if is_packed_call(h, current[0][2]) and "input_ids" in inputs \
                else h.shape[0]
    finally:
        for block, fwd in zip(blocks, own_forward):
            if fwd is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = fwd
    if not hidden and batches and is_vision_name(prefix):
        raise ValueError(f"no calibration batch has images for the vision blocks {prefix!r} (keys of the first: "
                         f"{sorted(_to_model(batches[0], device, model_dtype))}); quantizing vision blocks needs "
                         "image-text calibration")
    if not hidden:
        raise ValueError("no calibration batches were given")
    if is_packed_call(records[0][0][0], records[0][0][2]):
        if any(r is None for rec in records for r in rec):
            raise ValueError(f"the model did not call every block of {prefix!r} on every calibration batch")
        store = _Store([h.shape[0] for h in hidden], _device(store_device), _device(shared_device), alloc)
        return packed_capture(prefix, records, store, dtype)
    return _assemble(prefix, hidden, masks, records, nsamples, store_device, dtype, shared_device, alloc)


def _keep_rows(records: list[Any], keep: Tensor, rows: int) -> list[Any]:
    """Every block's record with only the `keep` rows of each tensor whose dim 0 has `rows` rows
    (one selected copy per tensor, so blocks keep sharing their arguments)."""
    idx = keep.nonzero().flatten()
    memo: dict[int, Any] = {}

    def pick(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return type(v)(pick(x) for x in v)
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != rows:
            return v
        if id(v) not in memo:
            memo[id(v)] = (v, v.index_select(0, idx.to(v.device)))
        return memo[id(v)][1]

    return [None if r is None else (pick(r[0]), tuple(pick(a) for a in r[1]), {k: pick(v) for k, v in r[2].items()}, r[3])
            for r in records]


def _device(d: Any) -> Optional[torch.device]:
    return torch.device(d) if d is not None else None


def _gather(hidden: list[Tensor], n: int, store_device: Optional[torch.device], dtype: Optional[torch.dtype],
            alloc: Optional[Alloc]) -> Tensor:
    """The first `n` captured rows in one stored tensor, copied batch by batch (no concatenated copy
    of every batch's hidden states beside the stored one)."""
    shapes = {tuple(h.shape[1:]) for h in hidden}
    if len(shapes) != 1:
        raise ValueError(f"calibration batches have different shapes {[tuple(h.shape) for h in hidden]}; "
                         "pad or truncate every batch to the same seqlen")
    first = hidden[0]
    shape, dtype = (n, *first.shape[1:]), dtype or first.dtype
    if alloc is not None:
        out = alloc(shape, dtype)
    else:
        device = store_device or first.device
        pin = device.type == "cpu" and torch.cuda.is_available()
        out = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    pos = 0
    for h in hidden:
        k = min(h.shape[0], n - pos)
        if k > 0:
            out[pos:pos + k].copy_(h[:k])
        pos += k
    return out


def _assemble(prefix: str, hidden: list[Tensor], masks: list[Optional[Tensor]], records: list[list[Any]],
              nsamples: Optional[int], store_device: Any, dtype: Optional[torch.dtype],
              shared_device: Any, alloc: Optional[Alloc] = None) -> CapturedInputs:
    sizes = [h.shape[0] for h in hidden]
    n = sum(sizes) if nsamples is None else min(nsamples, sum(sizes))
    store_device = torch.device(store_device) if store_device is not None else None
    shared_device = torch.device(shared_device) if shared_device is not None else None
    h_all = _gather(hidden, n, store_device, dtype, alloc)
    loss_mask = None
    if all(m is not None for m in masks):
        m_all = torch.cat([m.to(h_all.device) for m in masks], dim=0)[:n]
        loss_mask = None if bool((m_all == 1).all()) else m_all.to(torch.float32)
    store = _Store(sizes, store_device, shared_device, alloc)
    calls: list[Optional[BlockCall]] = []
    for b in range(len(records[0])):
        per_batch = [rec[b] for rec in records]
        if any(r is None for r in per_batch):
            calls.append(None)
            continue
        hidden_kwarg = per_batch[0][3]
        positional = tuple(store.leaf(f"{ARG_PREFIX}{i + 1}", [r[1][i] for r in per_batch])
                           for i in range(len(per_batch[0][1])))
        names = per_batch[0][2].keys()
        kwargs = {k: store.leaf(k, [r[2][k] for r in per_batch]) for k in names}
        calls.append(BlockCall(per_sample={}, shared={}, layout=CallLayout(hidden_kwarg, positional, kwargs)))
    per_sample = {k: v[:n] for k, v in store.per_sample.items()}
    calls = [None if c is None else attrs.evolve(c, per_sample=_used(c.layout, per_sample, True),
                                                 shared=_used(c.layout, store.shared, False)) for c in calls]
    return CapturedInputs(prefix=prefix, hidden=h_all, loss_mask=loss_mask, calls=tuple(calls))


def _leaves(spec: Any) -> list[Leaf]:
    if isinstance(spec, tuple):
        return [leaf for s in spec for leaf in _leaves(s)]
    return [spec]


def _used(layout: CallLayout, store: Mapping[str, Any], per_sample: bool) -> dict[str, Any]:
    leaves = [leaf for s in (*layout.positional, *layout.kwargs.values()) for leaf in _leaves(s)]
    return {leaf.key: store[leaf.key] for leaf in leaves if (leaf.batch_dim is not None) == per_sample}
