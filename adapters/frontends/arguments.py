"""Checking what a user asks for, before any work (spec/errors.md), in two stages:

- before the model loads (`check_paths`, `check_model_dir` and the value checks): the output,
  resume and report paths (overwrite replaces only a previous checkpoint, never the run's inputs),
  the model directory's files, layer_config syntax, recipe, device, dataset;
- once it is loaded, before tuning (`check_model`): layer_config keys against the model's layers,
  something left to quantize, finite weights, layers the export can write.

The facade turns the checked values into its one frozen `QuantizeConfig`; the CLI's `--dry-run`
runs exactly these checks. Messages name API arguments (`overwrite=True`); the CLI rewrites them
into its option names.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import attrs
import orjson
import torch
from torch import nn

from signround.adapters.checkpoint.files import check_replaceable
from signround.adapters.engine.resume import MANIFEST as RESUME_MANIFEST
from signround.adapters.hf.blocks import LayerPlan, check_layer_config_keys, conv1d_layers
from signround.adapters.engine.device import all_finite
from signround.rounding import QuantSpec, Recipe, preset
from signround.templating import ConversationDataset, SelfGenerated, TextDataset, load_dataset

LAYER_CONFIG_KEYS = {"bits", "group_size", "sym", "data_type"}
RECIPE_FIELDS = {f.name for f in attrs.fields(Recipe)}
Dataset = Union[TextDataset, ConversationDataset, SelfGenerated]
#: the text calibration set used when no dataset is given
DEFAULT_TEXT_DATASET = "builtin"


# ------------------------------------------------------------------------------ values


def check_layer_config(layer_config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Validate a layer_config mapping: keys are names/regexes, values QuantSpec or {bits, group_size, sym}."""
    if layer_config is None:
        return {}
    if not isinstance(layer_config, Mapping):
        raise ValueError(f"layer_config must be a mapping of layer name (or regex) to settings, got "
                         f"{type(layer_config).__name__}")
    out: dict[str, Any] = {}
    for key, value in layer_config.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"layer_config keys must be non-empty layer names or regexes, got {key!r}")
        try:
            re.compile(key.split(":", 1)[1] if key.startswith(("+:", "-:")) else key)
        except re.error as err:
            raise ValueError(f"layer_config key {key!r} is not a valid regular expression ({err})") from None
        if isinstance(value, QuantSpec):
            out[key] = value
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"layer_config[{key!r}] must be a mapping such as {{\"bits\": 8}} or a QuantSpec, "
                             f"got {value!r}")
        unknown = sorted(set(value) - LAYER_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"layer_config[{key!r}] has unknown setting(s) {unknown}; allowed: "
                             f"{sorted(LAYER_CONFIG_KEYS)}")
        bits = value.get("bits")
        if bits is not None and bits != 16:
            try:
                QuantSpec(bits=bits)
            except ValueError as err:
                raise ValueError(f"layer_config[{key!r}]: {err} (or 16 to keep the layer in full precision)") from None
        if "group_size" in value:
            try:
                QuantSpec(group_size=value["group_size"])
            except ValueError as err:
                raise ValueError(f"layer_config[{key!r}]: {err}") from None
        if "sym" in value and not isinstance(value["sym"], bool):
            raise ValueError(f"layer_config[{key!r}]: sym must be true or false, got {value['sym']!r}")
        out[key] = dict(value)
    return out


def read_layer_config(path: str | Path) -> dict[str, Any]:
    """Read a layer_config JSON file ({layer name or regex: {bits, group_size, sym}}); a string that
    starts with `{` is taken as the JSON text itself (auto-round's `--layer_config` spelling)."""
    text = str(path)
    if text.lstrip().startswith("{"):
        try:
            return check_layer_config(orjson.loads(text))
        except orjson.JSONDecodeError as err:
            raise ValueError(f"layer_config text is not valid JSON ({err})") from None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"layer config file {str(p)!r} does not exist")
    try:
        data = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    try:
        return check_layer_config(data)
    except ValueError as err:
        raise ValueError(f"{p}: {err}") from None


def resolve_recipe(recipe: Union[str, Recipe, None], **overrides: Any) -> Recipe:
    """A Recipe from a preset name or value, with non-None fields overridden (lr follows iters)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"unknown recipe setting(s) {unknown}; known: {sorted(RECIPE_FIELDS)}")
    base = preset(recipe or "default") if not isinstance(recipe, Recipe) else recipe
    return attrs.evolve(base, **overrides) if overrides else base


def check_device(device: Optional[str]) -> Optional[str]:
    """The device string to tune on, or None for the best available. Digits are CUDA indices, as
    auto-round's `--device 0` means."""
    if device is None or device == "auto":
        return None
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cuda', 'cuda:1', 'hpu', 'xpu' or 'cpu', got {device!r}")
    text = str(device).strip()
    if re.fullmatch(r"\d+(,\d+)+", text):
        raise ValueError(f"device {text!r}: one process tunes on one device; for several GPUs run "
                         "`torchrun --nproc-per-node N -m signround quantize …` (data parallel)")
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        dev = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err}); use cuda, cuda:N, xpu, hpu or cpu") from None
    if dev.type not in ("cuda", "xpu", "hpu", "cpu"):
        raise ValueError(f"device {device!r} is not supported: signround tunes on cuda, xpu, hpu or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"device {device!r} was asked for but no Intel XPU is available")
    if dev.type == "hpu":
        from signround.adapters.engine.device import hpu_available

        if not hpu_available():
            raise ValueError("device 'hpu' needs Intel Gaudi's habana_frameworks.torch, which is not installed")
    return str(dev)


def load_calibration_dataset(dataset: Any, recipe: Recipe, extra_data_dir: Optional[Path],
                             skip_bad_samples: bool) -> Optional[Dataset]:
    """The calibration data the arguments name (files are read and checked here); None for plain
    RTN without data. No dataset means the built-in text corpus."""
    if recipe.is_rtn and dataset is None:
        return None  # plain RTN needs no calibration data
    if dataset is None:
        return load_dataset(DEFAULT_TEXT_DATASET)
    if isinstance(dataset, (TextDataset, ConversationDataset, SelfGenerated)):
        return dataset
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(t, str) for t in dataset):
            raise ValueError("a dataset given as a list must be a non-empty list of strings (documents)")
        return TextDataset(tuple(dataset), "<list>")
    if isinstance(dataset, (str, Path)):
        return load_dataset(dataset, extra_data_dir=extra_data_dir, skip_bad_samples=skip_bad_samples)
    raise ValueError(f"dataset must be a path, a dataset name, or a list of strings, got {type(dataset).__name__}")


# ------------------------------------------------------------------------------ paths


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_write(directory: Path) -> None:
    """Create and remove a file in `directory` (raises OSError when that is impossible)."""
    fd, name = tempfile.mkstemp(prefix=".signround-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def check_creatable(path: str | Path, what: str) -> Path:
    """`path` resolved, when it could be created: its nearest existing ancestor is a writable
    directory (a file in the way, a read-only parent, raise before any work)."""
    p = Path(path).resolve()
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise NotADirectoryError(f"{what} {str(p)!r}: {str(base)!r} is a file, not a directory")
    try:
        _probe_write(base)
    except OSError as err:
        raise PermissionError(f"{what} {str(p)!r} cannot be written: {str(base)!r} is not writable "
                              f"({err.strerror or err})") from None
    return p


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(output: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (),
                     inputs: Iterable[str | Path] = ()) -> Path:
    """Fail before any work if `output` cannot be written: it overlaps (is, holds, or sits inside)
    one of `protect` (the input model: saving must never replace it), it is or holds one of
    `inputs` (dataset, layer config, template, image folder, resume store), it is a non-empty
    directory that is not a previous quantized checkpoint (or one, without `overwrite`), a file,
    or in a place that cannot be written."""
    out = Path(output).resolve()
    for p in protect:
        src = Path(p).resolve()
        if _overlaps(out, src):
            raise ValueError(f"output {str(out)!r} overlaps the input model at {str(src)!r}; choose another "
                             "directory so the original model is never replaced")
    for p in inputs:
        src = Path(p).resolve()
        if out == src or out in src.parents:
            raise ValueError(f"output {str(out)!r} holds {str(src)!r}, an input of this run; choose another "
                             "directory (a save replaces the whole output directory)")
    check_replaceable(out, overwrite=overwrite)
    return check_creatable(out, "output")


def check_resume_dir(resume_dir: str | Path, *, output: Optional[str | Path] = None) -> Path:
    """A resume directory: not a file, empty or a resume store (`resume.json`), apart from the
    output directory (which a save replaces whole)."""
    p = Path(resume_dir)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"resume_dir {str(p)!r} is a file; give a directory")
    if p.is_dir() and any(p.iterdir()) and not (p / RESUME_MANIFEST).is_file():
        raise FileExistsError(f"resume_dir {str(p)!r} is not empty and is not a signround resume directory; "
                              "give an empty or new directory")
    if output is not None and _overlaps(p.resolve(), Path(output).resolve()):
        raise ValueError(f"resume_dir {str(p)!r} and the output {str(output)!r} overlap; keep the resume "
                         "directory apart (the save replaces the output directory whole)")
    if not p.exists():
        check_creatable(p, "resume_dir")
    return p


def check_report_path(path: str | Path) -> Path:
    """Where the run report JSON goes: not a directory, in a place that can be written (missing
    parent folders are created when it is written)."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"report file {str(p)!r} is a directory; give a file path such as report.json")
    return check_creatable(p, "report file")


# ------------------------------------------------------------------------------ the model directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tekken.json")


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file cannot be read (header length, header JSON, data past the end), or None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "truncated (its header runs past the end of the file)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"not a safetensors file ({err})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + n + max(ends) > size:
        return f"truncated ({size} bytes, its tensors need {8 + n + max(ends)})"
    return None


def check_model_dir(path: str | Path) -> Path:
    """The files a local Hugging Face model directory needs, checked without loading it: a
    readable config.json, weights (safetensors whole, or .bin), tokenizer files. Each problem is
    one error naming the file."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {str(p)!r} is not a directory; pass a local Hugging Face model "
                                "directory (with config.json and weights) — downloads are not attempted")
    config = p / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(p)!r} has no config.json, so it is not a Hugging Face model directory")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{config}: has no model_type, so transformers cannot tell which model it is")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from None
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {missing[0]}, which is missing from {str(p)!r}")
        weights = [p / s for s in shards]
    else:
        weights = sorted(p.glob("*.safetensors"))
        if not weights and not any(p.glob("pytorch_model*.bin")):
            raise FileNotFoundError(f"{str(p)!r} has no weights (model.safetensors, a safetensors index, or "
                                    "pytorch_model.bin)")
    for w in weights:
        problem = _safetensors_problem(w)
        if problem:
            raise ValueError(f"{w}: {problem}; the weights file is damaged, copy it again")
    if not any((p / f).is_file() for f in TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise FileNotFoundError(f"{str(p)!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy "
                                "the tokenizer of the model into the directory")
    return p


# ------------------------------------------------------------------------------ the loaded model


def check_finite_weights(model: nn.Module, plan: LayerPlan) -> None:
    """NaN/Inf in a weight to be quantized would poison its scale: refuse before any work. Weights on
    the meta device are streamed from disk and checked as each block is read (`hf/streaming.py`)."""
    modules = dict(model.named_modules())
    for name in plan.quantize:
        weight = getattr(modules[name], "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta" and not all_finite(weight):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"layer {name!r} has {bad} NaN/Inf weight value(s); the model file is damaged or was "
                             "loaded in a dtype that overflows (try dtype=float32/bfloat16), or keep the layer "
                             f"in full precision with layer_config={{{name!r}: {{'bits': 16}}}}")


def check_model(model: nn.Module, blocks: Sequence[str], spec: QuantSpec, layer_config: Mapping[str, Any],
                plan: LayerPlan) -> None:
    """The checks that need the loaded model, before tuning: layer_config keys match layers, at least
    one layer is left to quantize, the export can write every layer, the weights are finite."""
    check_layer_config_keys(model, blocks, layer_config)
    if not plan.quantize:
        why = sorted(set(plan.skipped.values()))
        raise ValueError(f"no layer would be quantized with bits={spec.bits} group_size={spec.group_size}: "
                         f"{len(plan.skipped)} layer(s) stay in full precision ({'; '.join(why[:3]) or 'none found'}); "
                         "choose a group_size that divides the layer widths (e.g. 32, 64 or 128)")
    conv = conv1d_layers(plan, model)
    if conv:
        raise ValueError(f"{len(conv)} layer(s) are GPT-2 style Conv1D ({conv[0]}, …), which the checkpoint "
                         "export cannot write yet; quantize a model with nn.Linear layers")
    check_finite_weights(model, plan)


__all__ = ["DEFAULT_TEXT_DATASET", "check_creatable", "check_device", "check_finite_weights", "check_layer_config",
           "check_model", "check_model_dir", "check_output_dir", "check_replaceable", "check_report_path",
           "check_resume_dir", "load_calibration_dataset", "read_layer_config", "resolve_recipe"]
