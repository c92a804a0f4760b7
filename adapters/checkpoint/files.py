"""Checkpoint plumbing shared by export and loader: the per-layer result record, exact code
recovery, sharded safetensors I/O, the atomic output directory, and model ↔ checkpoint key names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from signround.rounding.grid import QuantizedWeight, codes_from_dequantized
from signround.rounding.spec import QuantSpec

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: files whose presence makes a directory look like a checkpoint
CHECKPOINT_MARKERS = ("config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)


@attrs.frozen
class LayerQuant:
    """What the engine hands to export for one quantized Linear: its grid and per-group parameters.

    scale fp16 [out, groups] (may be negative for sym), zero int32 [out, groups]. The Linear
    itself holds the fake-quantized weight `scale · (codes − zero)`.
    """

    spec: QuantSpec
    scale: Tensor
    zero: Tensor


def recover_codes(name: str, weight: Tensor, lq: LayerQuant) -> QuantizedWeight:
    """Integer codes of an on-grid `weight` [out, in]; verified: dequantizing them gives `weight` back.

    `codes_from_dequantized` rounds w/scale + zero; when the weight was stored in a low-precision
    dtype (bf16 keeps 8 significant bits) that quotient can land next to the right code, so the
    neighbours ±1 are tried for the (rare) elements that do not reproduce. Raises ValueError
    naming the layer if some element matches no code (the weight is not on the grid).
    """
    w = weight.detach()
    expected_groups = lq.spec.num_groups(w.shape[1])
    if tuple(lq.scale.shape) != (w.shape[0], expected_groups) or tuple(lq.zero.shape) != tuple(lq.scale.shape):
        raise ValueError(f"layer {name}: scale {tuple(lq.scale.shape)} / zero {tuple(lq.zero.shape)} do not match "
                         f"weight {tuple(w.shape)} at group_size {lq.spec.group_size} "
                         f"(expected [{w.shape[0]}, {expected_groups}])")
    scale = lq.scale.to(w.device, torch.float16)
    zero = lq.zero.to(w.device, torch.int32)
    codes = codes_from_dequantized(w, scale, zero, lq.spec)

    def dq(c: Tensor) -> Tensor:
        return QuantizedWeight(codes=c, scale=scale, zero=zero, spec=lq.spec).dequantize(w.dtype)

    bad = dq(codes) != w
    for delta in (-1, 1):
        if not bool(bad.any()):
            break
        alt = (codes + delta).clamp(0, lq.spec.maxq)
        fixed = bad & (dq(alt) == w)
        codes = torch.where(fixed, alt, codes)
        bad = bad & ~fixed
    if bool(bad.any()):
        n = int(bad.sum())
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"layer {name}: the weight is not on the quantization grid given for it ({n} of {w.numel()} elements "
            f"match no integer code, first at {idx}: weight {float(w[idx]):.6g}); was the Linear written back "
            "with the fake-quantized weight of exactly this scale/zero?"
        )
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, spec=lq.spec)


# --- safetensors, sharded ----------------------------------------------------------------------

def write_safetensors(state_dict: Mapping[str, Tensor], out_dir: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write `state_dict` as `model.safetensors`, or as `model-0000k-of-0000N.safetensors` shards plus
    `model.safetensors.index.json` when it exceeds `max_shard_size`. Returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(state_dict), max_shard_size=max_shard_size)
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {n: state_dict[n].detach().contiguous().cpu() for n in names}
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        written.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata.get("total_size", 0)}, "weight_map": split.tensor_to_filename}
        (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(SAFE_WEIGHTS_INDEX_NAME)
    return written


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory (from the index when sharded)."""
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected {SAFE_WEIGHTS_NAME} or "
                                f"{SAFE_WEIGHTS_INDEX_NAME})")
    return found


def checkpoint_keys(path: Path) -> list[str]:
    """All tensor names stored in the checkpoint at `path`."""
    keys: list[str] = []
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            keys.extend(fh.keys())
    return keys


def iter_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor in the checkpoint, one file open at a time."""
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


# --- atomic output directory -------------------------------------------------------------------

def _looks_used(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    On any error the temporary directory is removed and `out_dir` is left as it was, so an
    interrupted save never leaves something that looks like a checkpoint. A non-empty `out_dir`
    is refused unless `overwrite`.
    """
    out = Path(out_dir).resolve()
    if _looks_used(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{id(tmp)}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


# --- model module names ↔ checkpoint key names (transformers ≥ 5 renames some families) --------

def _conversions(model: nn.Module, *, for_saving: bool) -> tuple[list, list]:
    """(renamings, converters) that transformers applies between checkpoint and module names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: module names are checkpoint names
        return [], []
    if for_saving:
        conv = getattr(model, "_weight_conversions", None)
        if conv is None:
            conv = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        transforms = [c.reverse_transform() for c in conv[::-1]]
    else:
        transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def to_checkpoint_namer(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """A function mapping a module-side key to (checkpoint key, needs a weight converter)."""
    renamings, converters = _conversions(model, for_saving=True)
    if not renamings and not converters:
        return lambda key: (key, False)
    from transformers.core_model_loading import rename_source_key

    def name(key: str) -> tuple[str, bool]:
        new, pattern = rename_source_key(key, renamings, converters, reverse=True)
        return new, pattern is not None

    return name


def from_checkpoint_namer(model: nn.Module, module_keys: Mapping[str, object]) -> Callable[[str], tuple[str, bool]]:
    """A function mapping a checkpoint key to (module-side key, needs a weight converter)."""
    renamings, converters = _conversions(model, for_saving=False)
    prefix = getattr(model, "base_model_prefix", None) or None
    present = {k: True for k in module_keys}
    try:
        from transformers.core_model_loading import rename_source_key
    except ImportError:
        rename_source_key = None

    def name(key: str) -> tuple[str, bool]:
        if key in present or rename_source_key is None:
            return key, False
        new, pattern = rename_source_key(key, renamings, converters, prefix, present)
        return new, pattern is not None

    return name
