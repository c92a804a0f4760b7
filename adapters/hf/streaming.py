"""Models larger than RAM: a skeleton without block weights, each block read from the checkpoint's
safetensors shards when its turn comes and dropped after it.

    model = skeleton("path/to/model", dtype=torch.bfloat16)      # block weights on the meta device
    weights = StreamedWeights.open("path/to/model", model, ["model.layers"])
    weights.load_outside()              # embeddings, final norm, lm_head: read once, kept
    weights.load(block)                 # this block's tensors, from disk, on the CPU
    ...                                 # tune it, write it out
    weights.release(block)              # back to the meta device: its memory is free again

`CheckpointIndex.open` reads every shard's header (nothing else) and refuses, before any work, a
checkpoint whose index names a missing shard, whose shard is shorter than its header says
(truncated), or that lacks a tensor the model needs. Tensors are read with plain file reads into
tensors of their own (no memory map of a whole shard) and cast to the skeleton's dtype with the
same `.to(dtype)` `from_pretrained` applies, so a streamed block holds exactly the values of the
same block loaded in RAM.

The safetensors layout read here: 8 bytes little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets from the end of the header),
then the data.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import attrs
import torch
from torch import Tensor, nn

from signround.adapters.engine.device import all_finite
from signround.adapters.hf.blocks import blocks_of

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


#: namer(model, module keys) -> (checkpoint key -> (module key, converted)): how checkpoint names map
Namer = Callable[[nn.Module, Mapping[str, object]], Callable[[str], tuple[str, bool]]]


class CheckpointError(ValueError):
    """The input checkpoint cannot be streamed (missing or truncated shard, missing tensor)."""


@attrs.frozen
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header JSON) of one safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"shard {path.name} is truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"shard {path.name} is truncated: its header claims {n} bytes, the file has "
                                  f"{size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"shard {path.name} has an unreadable header ({err})") from None
    return 8 + n, header


@attrs.frozen
class CheckpointIndex:
    """Every tensor of a safetensors checkpoint directory: name → TensorEntry (headers only)."""

    path: Path
    entries: Mapping[str, TensorEntry]

    @classmethod
    def open(cls, path: str | Path) -> "CheckpointIndex":
        """Read the index (when sharded) and every shard's header; refuse missing shards, shards
        shorter than their headers, and index entries their shard does not hold."""
        p = Path(path)
        index = p / INDEX_NAME
        expected: dict[str, str] = {}
        if index.is_file():
            try:
                expected = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a safetensors index ({err})") from None
            files = sorted(set(expected.values()))
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {p} is incomplete: {len(missing)} of {len(files)} shard(s) named by "
                                      f"{INDEX_NAME} are missing ({', '.join(missing[:4])}"
                                      f"{' …' if len(missing) > 4 else ''}); download or copy them again")
        elif (p / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            files = sorted(f.name for f in p.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{p} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); streaming "
                                      "from disk reads safetensors checkpoints only")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            f = p / name
            start, header = _header(f)
            size = f.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                try:
                    dtype = DTYPES[info["dtype"]]
                    b, e = (int(x) for x in info["data_offsets"])
                    shape = tuple(int(s) for s in info["shape"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"shard {name}: unreadable entry for tensor {key!r} ({info!r})") from None
                if start + e > size:
                    raise CheckpointError(f"shard {name} is truncated: tensor {key!r} ends at byte {start + e}, the "
                                          f"file has {size} bytes; download or copy it again")
                entries[key] = TensorEntry(f, dtype, shape, start + b, start + e)
        wrong = [k for k, f in expected.items() if k not in entries or entries[k].file.name != f]
        if wrong:
            raise CheckpointError(f"{INDEX_NAME} names {len(wrong)} tensor(s) their shard does not hold "
                                  f"({', '.join(wrong[:3])}{' …' if len(wrong) > 3 else ''}); the checkpoint is damaged")
        return cls(p, entries)

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {e.dtype for e in self.entries.values()}

    def read(self, key: str) -> Tensor:
        """The tensor `key` as stored (a fresh CPU tensor, read with one file read)."""
        e = self.entries[key]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != e.nbytes:
            raise CheckpointError(f"shard {e.file.name}: read {got} of {e.nbytes} bytes of {key!r} (truncated?)")
        return buf.view(e.dtype).reshape(e.shape)


# ------------------------------------------------------------------------------ the skeleton


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While constructing: every parameter goes to the meta device as it is registered (so no
    weight is initialised or held), buffers stay real (rotary tables and other computed buffers
    are not in the checkpoint)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _checkpoint_dtype(index: CheckpointIndex) -> torch.dtype:
    floats = [d for d in (e.dtype for e in index.entries.values()) if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def skeleton(path: str | Path, *, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False) -> Any:
    """The model of the directory at `path` with every parameter on the meta device (no weights
    read), in `dtype` (default: as `from_pretrained(dtype="auto")` picks: the config's dtype, else
    the checkpoint's). Its config's `_name_or_path` is the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from signround.adapters.hf.model_io import is_multimodal_config

    p = Path(path)
    config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            dtype = _checkpoint_dtype(CheckpointIndex.open(p))
    cls = AutoModelForImageTextToText if is_multimodal_config(config) else AutoModelForCausalLM
    with _parameters_on_meta():
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config._name_or_path = str(p)
    return model.eval()


# ------------------------------------------------------------------------------ streamed weights


def _slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Full tensor name → every (module, attribute) holding that tensor (tied weights share one
    entry, listed under their first name)."""
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    first: dict[int, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                by_id.setdefault(id(p), []).append((module, pname))
                first.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                by_id.setdefault(id(b), []).append((module, bname))
                first.setdefault(id(b), f"{mname}.{bname}" if mname else bname)
    return {first[k]: v for k, v in by_id.items()}


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) → every full name under which the model holds it (tied weights: several)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for n, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(n)
    return names


@attrs.define
class StreamedWeights:
    """Reads a skeleton's tensors from its checkpoint: once for everything outside the block lists,
    block by block for the rest. `keys` maps each tensor the model needs (first name of tied ones)
    to its checkpoint key."""

    index: CheckpointIndex
    model: nn.Module
    prefixes: tuple[str, ...]
    keys: Mapping[str, str]
    slots: Mapping[str, list[tuple[nn.Module, str]]]

    @classmethod
    def open(cls, path: str | Path, model: nn.Module, prefixes: Iterable[str],
             namer: Optional[Namer] = None) -> "StreamedWeights":
        """Check, before any work, that the checkpoint at `path` holds every tensor `model` needs
        with the shape the model expects. namer(model, module keys) gives the function mapping a
        checkpoint key to (module key, needs a weight conversion), as transformers maps them on
        loading (`checkpoint.files.from_checkpoint_namer`, which the facade passes); default: the
        names are the module's own."""
        index = CheckpointIndex.open(path)
        slots = _slots(model)
        aliases = _aliases(model)
        module_keys = {n: None for ns in aliases.values() for n in ns}
        to_module = namer(model, module_keys) if namer is not None else (lambda key: (key, False))
        found: dict[str, str] = {}
        converted: set[str] = set()
        for ck in index.entries:
            name, conv = to_module(ck)
            if conv:
                converted.add(ck)
            found.setdefault(name, ck)
        keys: dict[str, str] = {}
        missing, wrong = [], []
        for name, places in slots.items():
            module, attr = places[0]
            t = getattr(module, attr)
            names = aliases.get(id(t), [name])
            ck = next((found[n] for n in names if n in found), None)
            if ck is None:
                missing.append(name)
                continue
            if tuple(index.entries[ck].shape) != tuple(t.shape):
                wrong.append(f"{name} {tuple(t.shape)} vs {ck} {index.entries[ck].shape}")
            keys[name] = ck
        used = sorted(ck for ck in keys.values() if ck in converted)
        if used:
            raise CheckpointError(f"the checkpoint stores {used[0]!r} (and {len(used) - 1} more) through a "
                                  "transformers weight conversion; streaming does not convert weights: load the "
                                  "model in RAM instead")
        if missing:
            raise CheckpointError(f"checkpoint {index.path} lacks {len(missing)} tensor(s) the model needs "
                                  f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}); it is incomplete or "
                                  "of another model")
        if wrong:
            raise CheckpointError(f"checkpoint {index.path}: tensor shapes differ from the model's config "
                                  f"({'; '.join(wrong[:3])})")
        return cls(index, model, tuple(prefixes), keys, slots)

    def _names_under(self, prefix: str) -> list[str]:
        return [n for n in self.keys if n.startswith(prefix + ".")]

    def _inside(self, name: str) -> bool:
        return any(name.startswith(p + ".") for p in self.prefixes)

    def outside_names(self) -> list[str]:
        return [n for n in self.keys if not self._inside(n)]

    def _target(self, name: str) -> Tensor:
        module, attr = self.slots[name][0]
        return getattr(module, attr)

    def _set(self, name: str, value: Tensor) -> None:
        for module, attr in self.slots[name]:
            old = getattr(module, attr)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                module._buffers[attr] = value

    def _read(self, names: Iterable[str], check_finite: bool = False) -> None:
        for name in names:
            target = self._target(name)
            t = self.index.read(self.keys[name])
            if t.dtype != target.dtype:
                t = t.to(target.dtype)
            if check_finite and not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{name} ({self.keys[name]} in {self.index.entries[self.keys[name]].file.name}) "
                                      f"has {bad} NaN/Inf value(s); the checkpoint is damaged, or keep the layer in "
                                      "full precision with layer_config")
            self._set(name, t)

    def load_outside(self) -> None:
        """Read every tensor outside the block lists (kept for the whole run)."""
        self._read(self.outside_names())

    def block_name(self, block: nn.Module) -> str:
        for prefix in self.prefixes:
            for i, b in enumerate(blocks_of(self.model, prefix)):
                if b is block:
                    return f"{prefix}.{i}"
        raise KeyError("the block is not one of the streamed block lists")

    def load(self, block: nn.Module, name: Optional[str] = None) -> None:
        """Read the tensors of `block` (named `name`, e.g. "model.layers.3") onto the CPU; a weight with
        NaN/Inf values is refused (an in-RAM run checks them all before tuning)."""
        self._read(self._names_under(name or self.block_name(block)), check_finite=True)

    def load_all(self) -> None:
        """Read every tensor: the model is then the in-RAM model `from_pretrained` would give."""
        self._read(self.keys, check_finite=False)

    def release(self, block: nn.Module, name: Optional[str] = None) -> None:
        """Put the block's tensors back on the meta device (their memory is freed)."""
        for n in self._names_under(name or self.block_name(block)):
            t = self._target(n)
            self._set(n, torch.empty(t.shape, dtype=t.dtype, device="meta"))


__all__ = ["CheckpointError", "CheckpointIndex", "StreamedWeights", "TensorEntry", "skeleton"]
