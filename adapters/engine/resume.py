"""Resuming a long run: every finished block's result is kept on disk as it completes.

    store = ResumeStore.open(resume_dir, fingerprint)     # same arguments → same fingerprint
    if store.has(block_name): result = store.load(block_name)   # a BlockResult
    ... after tuning a block: store.save(result)

A block's entry is its BlockResult: the quantized weights (only the tuned layers; everything else
in the block is unchanged), each layer's grid (scale, zero, spec) and its BlockReport. Each entry is written to a
temporary file and renamed, so a process killed at any point leaves either a whole entry or none.
The fingerprint (model config, quantization spec, recipe, layer config, block names, calibration
data) is checked when the store is opened: a store from different arguments is refused rather than
mixed in. Resuming replays the finished blocks' forward passes (no tuning), so the next block sees
exactly the inputs it saw in the uninterrupted run and the final checkpoint is bit-identical.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import attrs
import orjson
from safetensors.torch import load_file, save_file
from torch import Tensor

from signround.adapters.engine.report import BlockReport, BlockResult, LayerResult
from signround.rounding import QuantSpec

MANIFEST = "resume.json"


def fingerprint(parts: Mapping[str, Any], tensors: Any = ()) -> str:
    """A stable hash of the run's arguments (JSON-able `parts`) and calibration tensors."""
    h = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))
    for t in tensors:
        if isinstance(t, Mapping):
            for k in sorted(t):
                if isinstance(t[k], Tensor):
                    h.update(k.encode())
                    h.update(t[k].detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(t, Tensor):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_dir(path: str | os.PathLike) -> Path:
    """`path` as a resume directory: it may not exist yet, but it may not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"resume_dir {str(p)!r} is a file; give a directory")
    return p


def _file_name(block: str) -> str:
    return block.replace("/", "_") + ".safetensors"


@attrs.define
class ResumeStore:
    """A directory of finished blocks for one run (identified by its fingerprint)."""

    path: Path
    key: str

    @classmethod
    def open(cls, path: str | os.PathLike, key: str) -> "ResumeStore":
        p = check_dir(path)
        p.mkdir(parents=True, exist_ok=True)
        manifest = p / MANIFEST
        if manifest.is_file():
            try:
                saved = orjson.loads(manifest.read_bytes()).get("fingerprint")
            except orjson.JSONDecodeError:
                saved = None
            if saved != key:
                raise ValueError(f"resume_dir {str(p)!r} holds blocks of a run with different arguments (model, "
                                 "bits/group size, recipe, layer config or calibration data); use a new resume_dir "
                                 "or repeat the original arguments exactly")
        elif any(p.iterdir()):
            raise FileExistsError(f"resume_dir {str(p)!r} is not empty and is not a signround resume directory")
        else:
            _atomic_write(manifest, orjson.dumps({"fingerprint": key}))
        return cls(p, key)

    def has(self, block: str) -> bool:
        return (self.path / _file_name(block)).is_file()

    def finished(self) -> int:
        return sum(1 for f in self.path.glob("*.safetensors"))

    def save(self, result: BlockResult) -> None:
        """Write one finished block (atomic: temp file, then rename)."""
        tensors: dict[str, Tensor] = {}
        layers = {}
        for key, w in result.weights.items():
            tensors[f"w/{key}"] = w.detach().cpu().contiguous()
        for name, r in result.layers.items():
            tensors[f"scale/{name}"] = r.scale.detach().cpu().contiguous()
            tensors[f"zero/{name}"] = r.zero.detach().cpu().contiguous()
            layers[name] = {"name": r.name, "spec": r.spec.to_dict()}
        meta = {"layers": orjson.dumps(layers).decode(), "report": orjson.dumps(attrs.asdict(result.report)).decode()}
        target = self.path / _file_name(result.name)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)

    def load(self, block: str) -> BlockResult:
        """The BlockResult of a finished block, as `save` wrote it (tensors on the CPU)."""
        from safetensors import safe_open

        path = self.path / _file_name(block)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path), device="cpu")
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
        layers = {}
        for key, info in orjson.loads(meta["layers"]).items():
            layers[info["name"]] = LayerResult(name=info["name"], spec=QuantSpec(**info["spec"]),
                                               scale=tensors[f"scale/{key}"], zero=tensors[f"zero/{key}"])
        rep = orjson.loads(meta["report"])
        rep["layers"] = tuple(rep["layers"])
        return BlockResult(name=block, weights=weights, layers=layers, report=BlockReport(**rep))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
