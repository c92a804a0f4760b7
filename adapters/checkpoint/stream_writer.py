"""Writing a checkpoint as the blocks finish: the export of a streamed run (`hf/streaming.py`).

    with open_stream(out_dir, model, "auto_round", plan.quantize, ["model.layers"]) as writer:
        quantize_model(model, batches, spec, recipe, stream=weights, sink=writer)   # write_block per block
        writer.finish(report, recipe=recipe, tokenizer=tokenizer)

Each finished block's tensors (its quantized Linears packed exactly as `save_quantized` packs them)
go to a shard of their own the moment the block is done, so no more than one block is ever held
for writing; what lies outside the blocks, the shard index, `config.json` and the tokenizer files
follow at the end. Packing, dtypes, key names and `quantization_config` come from the same
functions `save_quantized` uses (`export.py`), so the tensors are those of `save_quantized` on the
same model; only the shard layout differs (one shard per block plus one for the rest).

Everything is written into a temporary directory beside `out_dir` (`files.atomic_dir`, with its
lock and overwrite rule) that replaces `out_dir` only when `finish` has run: a run that fails or is
interrupted leaves no partial checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import attrs
from safetensors.torch import save_file
from torch import Tensor, nn

from signround.adapters.checkpoint.config import in_blocks
from signround.adapters.checkpoint.export import (_pack, _packed_state_dict, _save_side_files, _write_config,
                                                  checkpoint_tensors, format_dirname, global_spec,
                                                  quantization_config_of)
from signround.adapters.checkpoint.files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, atomic_dir
from signround.adapters.checkpoint.formats import choose_packing, parse_formats
from signround.rounding.recipe import Recipe
from signround.rounding.spec import QuantSpec


@attrs.frozen
class _Spec:
    spec: QuantSpec


@attrs.define
class _Shard:
    path: Path
    keys: list[str]
    nbytes: int


@attrs.define
class StreamWriter:
    """One checkpoint (or one per format) written block by block into `root`.

    specs: the plan's layer → QuantSpec (which fixes the packing before any block is done);
    block_prefixes: the block lists, as export names them."""

    root: Path
    model: nn.Module
    formats: tuple[str, ...]
    specs: Mapping[str, QuantSpec]
    block_prefixes: tuple[str, ...]
    shards: dict[str, list[_Shard]] = attrs.field(factory=dict)
    finished: bool = False
    _spec: QuantSpec = attrs.field(init=False)
    _packings: dict[str, Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        planned = {n: _Spec(s) for n, s in self.specs.items()}
        self._spec = global_spec(planned)
        self._packings = {f: choose_packing(f, self._spec, list(self.specs.values())) for f in self.formats}
        for f in self.formats:
            self.folder(f).mkdir(parents=True, exist_ok=True)
            self.shards[f] = []

    def folder(self, fmt: str) -> Path:
        return self.root if len(self.formats) == 1 else self.root / format_dirname(fmt)

    def _write(self, state: Mapping[str, Tensor], layers: Mapping[str, Any]) -> None:
        for fmt in self.formats:
            packed = _pack(self.model, layers, self._packings[fmt])
            tensors = checkpoint_tensors(self.model, _packed_state_dict(self.model, packed, state), packed, fmt)
            shards = self.shards[fmt]
            path = self.folder(fmt) / f".part-{len(shards):05d}.safetensors"
            data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(data, str(path), metadata={"format": "pt"})
            shards.append(_Shard(path, sorted(data), sum(v.numel() * v.element_size() for v in data.values())))

    def write_block(self, name: str, block: nn.Module, result: Any) -> None:
        """Write block `name` (its weights already quantized, the engine's BlockResult beside it)."""
        if self.finished:
            raise RuntimeError("the stream writer is finished; no more blocks can be written")
        state = {f"{name}.{k}": v for k, v in block.state_dict().items()}
        self._write(state, dict(result.layers))

    def finish(self, report: Any, *, recipe: Optional[Recipe] = None, extra_info: Optional[Mapping[str, Any]] = None,
               tokenizer: Any = None, processor: Any = None, image_processor: Any = None) -> None:
        """Write what lies outside the blocks (its quantized layers packed, e.g. lm_head), the shard
        index, the config with its quantization_config, and the tokenizer/processor files."""
        layers = dict(report.layers)
        final = global_spec(layers)
        for fmt in self.formats:
            packing = choose_packing(fmt, final, [r.spec for r in layers.values()])
            if final != self._spec or packing != self._packings[fmt]:
                raise ValueError(f"the layers quantized differ from the plan the blocks were packed for ({final} vs "
                                 f"{self._spec}); rerun without streaming")
        prefixes = self.block_prefixes
        outside_state = {k: v for k, v in self.model.state_dict().items() if not in_blocks(k, prefixes)}
        meta = [k for k, v in outside_state.items() if v.device.type == "meta"]
        if meta:
            raise ValueError(f"tensors outside the blocks were never read ({', '.join(meta[:3])}); cannot write them")
        outside_layers = {n: r for n, r in layers.items() if not in_blocks(n, prefixes)}
        self._write(outside_state, outside_layers)
        for fmt in self.formats:
            folder = self.folder(fmt)
            self._name_shards(folder, self.shards[fmt])
            qc = quantization_config_of(self.model, layers, fmt, final, list(prefixes), recipe, extra_info)
            _write_config(self.model, folder, qc, fmt)
            _save_side_files(folder, tokenizer, processor, image_processor)
        self.finished = True

    @staticmethod
    def _name_shards(folder: Path, shards: list[_Shard]) -> None:
        if len(shards) == 1:
            shards[0].path.rename(folder / SAFE_WEIGHTS_NAME)
            return
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            shard.path.rename(folder / name)
            weight_map.update({key: name for key in shard.keys})
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def open_stream(out_dir: str | Path, model: nn.Module, format: str | Sequence[str], specs: Mapping[str, QuantSpec],
                block_prefixes: Sequence[str], *, overwrite: bool = False) -> Iterator[StreamWriter]:
    """A StreamWriter into a temporary directory that becomes `out_dir` when the block ends after
    `finish` (removed otherwise: no partial checkpoint is ever left at `out_dir`)."""
    formats = parse_formats(format)
    if not specs:
        raise ValueError("no quantized layers to export (the plan quantizes nothing)")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = StreamWriter(tmp, model, tuple(formats), dict(specs), tuple(block_prefixes))
        yield writer
        if not writer.finished:
            raise RuntimeError("the streamed checkpoint was not finished (StreamWriter.finish was not called); "
                               "nothing was written")


__all__ = ["StreamWriter", "open_stream"]
