"""Checkpoint plumbing shared by export and loader: the per-layer result record, exact code
recovery, sharded safetensors I/O, the atomic output directory, and model ↔ checkpoint key names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Optional

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from signround.rounding.grid import QuantizedWeight, codes_from_dequantized
from signround.rounding.spec import QuantSpec

try:  # POSIX: locks are flock()s the kernel drops when a process dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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


# --- what may be replaced, locks, the atomic output directory -----------------------------------

#: quant_method values of the checkpoints `overwrite` may replace (ours and auto-round's formats)
REPLACEABLE_METHODS = ("auto-round", "intel/auto-round", "gptq")
#: file names a quantized checkpoint holds (weights, configs, tokenizer and processor files)
CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
                    "pytorch_model*.bin")
_TMP, _OLD = ".tmp-", ".old-"


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)


def _quant_method(config: Path) -> Optional[str]:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if isinstance(method, str) else None


def not_a_checkpoint(path: str | os.PathLike) -> Optional[str]:
    """Why the existing directory `path` is not a quantized checkpoint that may be replaced, or None
    when it is one: a `config.json` whose `quantization_config.quant_method` is auto-round's or
    gptq's, safetensors weights, and nothing but checkpoint files (`CHECKPOINT_FILES`); or only
    sub-folders that are each such a checkpoint (several formats in one save)."""
    p = Path(path)
    entries = sorted(p.iterdir())
    dirs = [e for e in entries if e.is_dir()]
    if dirs and len(dirs) == len(entries):  # one sub-folder per format
        for d in dirs:
            why = not_a_checkpoint(d)
            if why is not None:
                return f"{d.name}/: {why}"
        return None
    if not (p / "config.json").is_file():
        return "it has no config.json"
    method = _quant_method(p / "config.json")
    if method not in REPLACEABLE_METHODS:
        return ("its config.json has no quantization_config of auto-round or gptq" if method is None
                else f"its quantization_config is {method!r}, not auto-round or gptq")
    if not any(e.suffix == ".safetensors" for e in entries):
        return "it has no safetensors weights"
    other = [e.name + ("/" if e.is_dir() else "") for e in entries if e.is_dir() or not _is_checkpoint_file(e.name)]
    if other:
        return f"it also holds {', '.join(other[:5])}{' …' if len(other) > 5 else ''}, which a checkpoint does not"
    return None


def check_replaceable(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`out_dir` resolved, if a save may write there: it does not exist, is an empty directory, or
    (with `overwrite`) holds a previous quantized checkpoint (`not_a_checkpoint`). Anything else
    raises FileExistsError naming what is there: overwrite never deletes other files."""
    out = Path(out_dir).resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} is a file; give a directory path")
    if not any(out.iterdir()):
        return out
    why = not_a_checkpoint(out)
    if not overwrite:
        what = "holds a quantized checkpoint" if why is None else "is not empty"
        hint = "pass overwrite=True to replace it, or choose" if why is None else "choose"
        raise FileExistsError(f"output directory {str(out)!r} {what}; {hint} a new path")
    if why is not None:
        raise FileExistsError(f"output directory {str(out)!r} is not a quantized checkpoint ({why}); overwrite=True "
                              "only replaces a previous signround/auto-round checkpoint: choose a new path")
    return out


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


class Locked(FileExistsError):
    """Another process holds the lock on an output or resume directory."""


_HELD: dict[Path, list[int]] = {}  # lock file -> [fd, depth]: re-entrant within a process


@contextlib.contextmanager
def dir_lock(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Hold an exclusive lock on the directory `path` (which may not exist yet) while the block runs.

    The lock is `flock` on `.NAME.lock` beside it, so it is released by the kernel when the process
    dies (SIGKILL included) and never needs clearing by hand; the file is removed on release. A second
    process asking for it gets `Locked` naming the holder's pid. Re-entrant within one process (the
    CLI holds the output's lock for the whole run and the save takes it again)."""
    target = Path(path).resolve()
    lock = _lock_path(target)
    if lock in _HELD:
        _HELD[lock][1] += 1
        try:
            yield
        finally:
            _HELD[lock][1] -= 1
        return
    if fcntl is None:  # no flock on this platform: no lock (documented in spec/errors.md)
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Locked(f"{what} {str(target)!r} is in use by another signround run ({holder}); wait for it to "
                         f"finish, or use another {what} directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: retry
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    _HELD[lock] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[lock]
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Temporary folders an interrupted save to `out_dir` left beside it (`.NAME.tmp-*` being
    written, `.NAME.old-*` being removed), holding nothing but checkpoint files. Only meaningful
    under `dir_lock(out_dir)`: then no other save to `out_dir` is running."""
    out = Path(out_dir).resolve()
    if not out.parent.is_dir():
        return []
    found = []
    for marker in (_TMP, _OLD):
        for p in sorted(out.parent.glob(f".{glob.escape(out.name)}{marker}*")):
            if p.is_dir() and all(_is_checkpoint_file(f.name) or f.is_dir() for f in p.rglob("*")):
                found.append(p)
    return found


def clean_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove `stale_temporaries(out_dir)` (with a warning naming them); returns what was removed."""
    stale = stale_temporaries(out_dir)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (" …" if len(stale) > 3 else "")
        warnings.warn(f"removed {len(stale)} temporary folder(s) left beside {Path(out_dir).name} by an interrupted "
                      f"save ({names})", stacklevel=2)
    return stale


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new directory `parent/prefix<pid>-<random>` with the usual permissions (0777 less the umask,
    where tempfile.mkdtemp would give 0700)."""
    while True:
        p = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def _usual_permissions(root: Path) -> None:
    """Folders 0777 and files 0666, less the umask, as a plain `mkdir`/`open` would make them
    (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`.

    Under `dir_lock(out_dir)`: `out_dir` must pass `check_replaceable` (overwrite replaces only a
    previous quantized checkpoint); temporaries an interrupted save left are removed first. On any
    error the temporary directory is removed and `out_dir` is left as it was, so an interrupted save
    never leaves something that looks like a checkpoint.
    """
    out = Path(out_dir).resolve()
    with dir_lock(out):
        check_replaceable(out, overwrite=overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out)
        tmp = _fresh_dir(out.parent, f".{out.name}{_TMP}")
        try:
            yield tmp
            _usual_permissions(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
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
            # A prefix change scoped to a sub-model (CLIP / SigLIP towers of LLaVA and Gemma-3 drop
            # `vision_model.`) is reversed too, so the tower is saved under its original checkpoint names
            # (`vision_tower.vision_model.encoder.…`, which vLLM's loader requires); the model-wide ones
            # are covered by the legacy renamings.
            conv = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                    if not isinstance(c, PrefixChange) or getattr(c, "scope_prefix", None)]
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
        if pattern is not None:  # a tensor the model holds as it is stored (MoE experts unfused by
            # hf/experts.py: Mixtral's block_sparse_moe.experts.0.w1.weight) needs the renamings only
            plain, _ = rename_source_key(key, renamings, [], prefix, present)
            if plain in present:
                return plain, False
        return new, pattern is not None

    return name
