"""`AutoRound` / `AutoRoundMLLM`: the one-object API, as AutoRound users know it.

    ar = AutoRoundMLLM(model, tokenizer, processor=processor, bits=4, group_size=128,
                       dataset="llava.json", extra_data_dir="images/")
    ar.quantize()
    ar.save_quantized("out/", format="auto_round", inplace=True)

Everything is validated in the constructor, before any tuning: a bad spec, recipe value, layer
config, block name, dataset, image or template fails there with a message naming what and where.
The work itself is done by the library's steps: `templating` builds calibration batches,
`quantize_model` tunes, `save_quantized` exports.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import attrs
import orjson
import torch
from torch import nn

from signround.adapters.engine import distributed, runtime
from signround.adapters.hf.blocks import BLOCK_REGISTRY, LayerPlan, blocks_of, find_block_lists, select_layers
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.report import QuantReport
from signround.adapters.engine.resume import ResumeStore, fingerprint
from signround.rounding import QuantSpec, Recipe, preset
from signround.templating import (
    ConversationDataset,
    TextDataset,
    conversation_calibration,
    conversation_texts,
    load_dataset,
    load_template,
    render,
    text_calibration,
)
from signround.templating.calibration import calibration_batches
from signround.templating.processors import SEQUENCE_KEYS

LAYER_CONFIG_KEYS = {"bits", "group_size", "sym", "data_type"}
RECIPE_FIELDS = {f.name for f in attrs.fields(Recipe)}
MLLM_DEFAULT_SEQLEN = 512  # the reference's cap for image-text calibration
# Vision towers that take all images' patches packed into one sequence (no per-sample batch
# dimension, cu_seqlens boundaries): their blocks cannot be tuned on sampled mini-batches yet.
PACKED_VISION_TOWERS = ("qwen2_vl", "qwen2_5_vl")
# Families whose decoder blocks take image features without a per-sample batch dimension.
PACKED_CROSS_ATTENTION = ("mllama",)


def _check_layer_config(layer_config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
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
            re.compile(key)
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
    """Read a layer_config JSON file ({layer name or regex: {bits, group_size, sym}})."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"layer config file {str(p)!r} does not exist")
    try:
        data = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    try:
        return _check_layer_config(data)
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


def _pad_samples(samples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-pad every sample's sequence tensors to the longest sample, so all batches share one
    length (block inputs are stacked across batches); padding is masked out of the loss.

    Sequence tensors are [L] or [1, L] (padded on the last dim) or [1, L, ...] (padded on dim 1).
    """
    longest = max(s["input_ids"].shape[-1] for s in samples)
    out = []
    for s in samples:
        extra = longest - s["input_ids"].shape[-1]
        row = {}
        for k, v in s.items():
            if k in SEQUENCE_KEYS and extra:
                value = pad_token_id if k == "input_ids" else (-100 if k == "labels" else 0)
                pads = [0, extra] if v.dim() <= 2 else [0, 0] * (v.dim() - 2) + [0, extra]
                v = torch.nn.functional.pad(v, pads, value=value)
            row[k] = v
        out.append(row)
    return out


class AutoRound:
    """Quantize a text LLM (or the text decoder of a VLM on text) with SignRound.

    Arguments follow the reference: bits, group_size, sym; recipe ("default", "light", "best",
    "rtn" or a Recipe) with iters/lr/minmax_lr/nsamples/seqlen/batch_size/gradient_accumulate_steps/
    seed/enable_minmax_tuning/enable_quanted_input/amp overriding it; dataset (a path, "embedded", or
    a list of strings); layer_config ({name or regex: {bits, group_size, sym}}, bits 16 = keep fp);
    to_quant_block_names (block-list prefixes, or comma-separated regexes); device; low_gpu_mem_usage.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, bits: int = 4, group_size: int = 128,
                 sym: bool = True, recipe: Union[str, Recipe, None] = "default", dataset: Any = None,
                 iters: Optional[int] = None, lr: Optional[float] = None, minmax_lr: Optional[float] = None,
                 nsamples: Optional[int] = None, seqlen: Optional[int] = None, batch_size: Optional[int] = None,
                 gradient_accumulate_steps: Optional[int] = None, seed: Optional[int] = None,
                 enable_minmax_tuning: Optional[bool] = None, enable_quanted_input: Optional[bool] = None,
                 amp: Optional[bool] = None, device: Optional[str] = None, low_gpu_mem_usage: bool = False,
                 layer_config: Optional[Mapping[str, Any]] = None,
                 to_quant_block_names: Union[str, Sequence[str], None] = None,
                 skip_bad_samples: bool = False, resume_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        self.recipe = resolve_recipe(recipe, iters=iters, lr=lr, minmax_lr=minmax_lr, nsamples=nsamples,
                                     seqlen=seqlen, batch_size=batch_size,
                                     gradient_accumulate_steps=gradient_accumulate_steps, seed=seed,
                                     enable_minmax_tuning=enable_minmax_tuning,
                                     enable_quanted_input=enable_quanted_input, amp=amp)
        self._seqlen_given = seqlen is not None
        self.layer_config = _check_layer_config(layer_config)
        self.data_parallel = distributed.from_env()
        if self.data_parallel is not None and device is None:
            device = self.data_parallel.device()
        if self.data_parallel is not None:  # before any data is read
            runtime.check_ranks(self.recipe, self.data_parallel.world)
        self.device = self._check_device(device)
        self.low_gpu_mem_usage = bool(low_gpu_mem_usage)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.progress = progress and (self.data_parallel is None or self.data_parallel.is_main)
        self.resume_dir = resume_dir
        if resume_dir is not None and Path(resume_dir).exists() and not Path(resume_dir).is_dir():
            raise FileExistsError(f"resume_dir {str(resume_dir)!r} is a file; give a directory")
        self.quant_nontext_module = getattr(self, "quant_nontext_module", False)
        self.block_names = self._resolve_block_names(to_quant_block_names)
        self._check_finite_weights()
        self.dataset = self._load_dataset(dataset)
        self.report: Optional[QuantReport] = None

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def _check_device(device: Optional[str]) -> Optional[str]:
        if device is None or device == "auto":
            return None
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"device must be a string such as 'cuda', 'cuda:1', 'hpu', 'xpu' or 'cpu', got {device!r}")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r} ({err}); use cuda, cuda:N, xpu, hpu or cpu") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"device {device!r} was asked for but no Intel XPU is available")
        if dev.type == "hpu":
            from signround.adapters.engine.device import hpu_available

            if not hpu_available():
                raise ValueError("device 'hpu' needs Intel Gaudi's habana_frameworks.torch, which is not installed")
        return str(dev)

    def _check_finite_weights(self) -> None:
        """NaN/Inf in a weight to be quantized would poison its scale: refuse before any work."""
        plan = self.plan()
        modules = dict(self.model.named_modules())
        for name in plan.quantize:
            weight = getattr(modules[name], "weight", None)
            if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
                bad = int((~torch.isfinite(weight)).sum())
                raise ValueError(f"layer {name!r} has {bad} NaN/Inf weight value(s); the model file is damaged or was "
                                 "loaded in a dtype that overflows (try dtype=float32/bfloat16), or keep the layer "
                                 f"in full precision with layer_config={{{name!r}: {{'bits': 16}}}}")

    def _resolve_block_names(self, names: Union[str, Sequence[str], None]) -> list[str]:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if names is None and model_type not in BLOCK_REGISTRY:
            warnings.warn(f"model type {model_type!r} has no registered block layout; using the generic finder "
                          f"(the largest list of repeated blocks). Known types: {sorted(BLOCK_REGISTRY)}. Check the "
                          "plan with --dry-run, or name the blocks with to_quant_block_names.", stacklevel=3)
        found = find_block_lists(self.model, self.quant_nontext_module)
        if names is None:
            if not found:
                raise ValueError(f"found no block list (a ModuleList of decoder layers) in {type(self.model).__name__}; "
                                 "name one with to_quant_block_names, e.g. 'model.layers'")
            return found
        if isinstance(names, str):
            patterns = [p.strip() for p in names.split(",") if p.strip()]
            all_lists = [n for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
            chosen = []
            for pat in patterns:
                exact = [n for n in all_lists if n == pat]
                hits = exact or [n for n in all_lists if re.search(pat, n)]
                if not hits:
                    raise ValueError(f"to_quant_block_names: {pat!r} matches no block list; lists in this model: "
                                     f"{all_lists[:12]}")
                chosen += [h for h in hits if h not in chosen]
            return chosen
        out = list(names)
        for n in out:
            try:
                blocks_of(self.model, n)
            except (AttributeError, KeyError, ValueError, TypeError) as err:
                raise ValueError(f"to_quant_block_names: {n!r} is not a block list of this model ({err})") from None
        return out

    def _load_dataset(self, dataset: Any) -> Union[TextDataset, ConversationDataset, None]:
        if self.recipe.is_rtn and dataset is None:
            return None  # plain RTN needs no calibration data
        if dataset is None:
            return load_dataset("embedded_text")
        if isinstance(dataset, (TextDataset, ConversationDataset)):
            return dataset
        if isinstance(dataset, (list, tuple)):
            if not dataset or not all(isinstance(t, str) for t in dataset):
                raise ValueError("a dataset given as a list must be a non-empty list of strings (documents)")
            return TextDataset(tuple(dataset), "<list>")
        if isinstance(dataset, (str, Path)):
            return load_dataset(dataset, extra_data_dir=getattr(self, "extra_data_dir", None),
                                skip_bad_samples=self.skip_bad_samples)
        raise ValueError(f"dataset must be a path, a dataset name, or a list of strings, got {type(dataset).__name__}")

    # -- steps ------------------------------------------------------------------------------
    def plan(self) -> LayerPlan:
        """Which layers would be quantized with which grid, and which stay in full precision (and why)."""
        return select_layers(self.model, self.block_names, self.spec, self.layer_config)

    def _text_documents(self) -> TextDataset:
        assert self.dataset is not None
        if isinstance(self.dataset, ConversationDataset):
            template = load_template(getattr(self, "template", None), getattr(self.model.config, "model_type", None))
            return conversation_texts(self.dataset, lambda turns: render(template, turns))
        return self.dataset

    def calibration(self) -> Optional[list[dict[str, torch.Tensor]]]:
        """Calibration batches for the model's forward (None for RTN without data)."""
        if self.dataset is None:
            return None
        if self.tokenizer is None:
            raise ValueError("calibration needs the model's tokenizer; pass tokenizer=")
        docs = self._text_documents()
        samples = text_calibration(docs.texts, self.tokenizer, seqlen=self.recipe.seqlen, nsamples=self.recipe.nsamples,
                                   seed=self.recipe.seed)
        return calibration_batches(samples, self.recipe.batch_size)

    def quantize(self) -> QuantReport:
        """Tune every block (or round, for the `rtn` recipe); the model's weights become quantized."""
        if self.report is not None:
            raise ValueError("this model is already quantized; build a new AutoRound for another run")
        batches = self.calibration()
        resume = None if self.resume_dir is None else ResumeStore.open(self.resume_dir, self._fingerprint(batches))
        try:
            _, self.report = quantize_model(self.model, batches, self.spec, self.recipe, layer_config=self.layer_config,
                                            block_names=self.block_names,
                                            quant_nontext_module=self.quant_nontext_module, device=self.device,
                                            low_gpu_mem_usage=self.low_gpu_mem_usage, progress=self.progress,
                                            resume=resume, data_parallel=self.data_parallel)
        except torch.OutOfMemoryError as err:
            r = self.recipe
            hints = [] if self.low_gpu_mem_usage else ["low_gpu_mem_usage=True (--low-gpu-mem-usage) keeps "
                                                        "calibration activations on the CPU"]
            if r.batch_size > 1:
                hints.append(f"a smaller batch with accumulation, e.g. batch_size={max(1, r.batch_size // 2)} "
                             f"gradient_accumulate_steps={r.gradient_accumulate_steps * 2} (same effective batch)")
            hints.append(f"fewer or shorter samples (nsamples={r.nsamples}, seqlen={r.seqlen} now)")
            raise MemoryError("out of memory on the accelerator while tuning. Options: " + "; ".join(hints)
                              + f". ({str(err).splitlines()[0]})") from err
        return self.report

    def _fingerprint(self, batches: Optional[list[dict[str, torch.Tensor]]]) -> str:
        """What makes two runs the same run: model config, grid, recipe, layers, blocks, data."""
        config = getattr(self.model, "config", None)
        parts = {"config": config.to_dict() if config is not None else type(self.model).__name__,
                 "spec": self.spec.to_dict(), "recipe": attrs.asdict(self.recipe),
                 "layer_config": {k: (v.to_dict() if isinstance(v, QuantSpec) else v) for k, v in self.layer_config.items()},
                 "blocks": self.block_names, "nontext": self.quant_nontext_module}
        return fingerprint(parts, batches or ())

    def save_quantized(self, output_dir: str | Path, format: Union[str, Sequence[str]] = "auto_round",
                       inplace: bool = True, overwrite: bool = False) -> Union[Path, dict[str, Path]]:
        """Write the checkpoint(s); the directory appears complete or not at all."""
        from signround.adapters.checkpoint.export import save_quantized

        if self.report is None:
            raise ValueError("nothing to save yet: call quantize() first")
        for name, layer in self.report.layers.items():
            if not bool(torch.isfinite(layer.scale.float()).all()):
                raise ValueError(f"layer {name!r} has NaN/Inf quantization scales; refusing to write a broken "
                                 "checkpoint (check the calibration data and the model's activations)")
        dp = self.data_parallel
        if dp is not None and not dp.is_main:  # every rank holds the same result; rank 0 writes it
            dp.barrier()
            return Path(output_dir)
        path = save_quantized(self.model, self.report.layers, output_dir, format=format, inplace=inplace,
                              tokenizer=self.tokenizer, processor=getattr(self, "processor", None),
                              image_processor=getattr(self, "image_processor", None),
                              block_name_to_quantize=list(self.report.block_name_to_quantize),
                              recipe=self.recipe, overwrite=overwrite)
        if dp is not None:
            dp.barrier()
        return path


class AutoRoundMLLM(AutoRound):
    """AutoRound for vision-language models.

    By default only the text decoder is quantized, calibrated on text (the reference's default);
    a dataset with images (llava JSON) calibrates on image-text through the template's processor;
    `quant_nontext_module=True` also quantizes the vision blocks and needs image-text data (the
    built-in image-text set when no dataset is given). The processor may be passed as `processor=`
    or ride on the tokenizer (`tokenizer.processor`), as in AutoRound's examples.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, processor: Any = None, image_processor: Any = None,
                 *, extra_data_dir: str | Path | None = None, template: Union[str, Path, None] = None,
                 quant_nontext_module: bool = False, max_pixels: Optional[int] = None, **kwargs: Any) -> None:
        if processor is None and tokenizer is not None:
            processor = getattr(tokenizer, "processor", None)
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        self.processor = processor
        self.image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor", None)
        if extra_data_dir is not None and not Path(extra_data_dir).is_dir():
            raise FileNotFoundError(f"extra_data_dir {str(extra_data_dir)!r} is not a directory")
        self.extra_data_dir = extra_data_dir
        self.quant_nontext_module = bool(quant_nontext_module)
        self.max_pixels = max_pixels
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if self.quant_nontext_module and model_type in PACKED_VISION_TOWERS:
            raise ValueError(f"quant_nontext_module is not supported for {model_type}: its vision blocks take every "
                             "image's patches packed into one sequence, which block-wise tuning cannot split into "
                             "samples yet; quantize the text decoder only (the default)")
        self.template = load_template(template, model_type)
        if self.quant_nontext_module and kwargs.get("dataset") is None:
            kwargs["dataset"] = "embedded"
        super().__init__(model, tokenizer, **kwargs)
        if self.quant_nontext_module and not self._has_images():
            raise ValueError("quant_nontext_module=True tunes the vision blocks, which needs image-text data: "
                             "pass a llava JSON dataset with images (or no dataset for the built-in set)")
        if self._has_images() and model_type in PACKED_CROSS_ATTENTION:
            raise ValueError(f"image-text calibration is not supported for {model_type} yet: its cross-attention "
                             "states are packed per image tile, which block-wise tuning cannot split into samples; "
                             "calibrate on text (the default: no dataset, or a text file)")
        if self._has_images() and self.processor is None:
            raise ValueError("this dataset has images, which need the model's processor: pass processor= "
                             "(e.g. AutoProcessor.from_pretrained(path))")

    def _has_images(self) -> bool:
        return isinstance(self.dataset, ConversationDataset) and any(s.images for s in self.dataset.samples)

    def calibration(self) -> Optional[list[dict[str, torch.Tensor]]]:
        if not self._has_images():
            return super().calibration()
        seqlen = self.recipe.seqlen if self._seqlen_given else MLLM_DEFAULT_SEQLEN
        kw = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
        assert isinstance(self.dataset, ConversationDataset)
        calib = conversation_calibration(self.dataset, self.template, tokenizer=self.tokenizer, processor=self.processor,
                                         seqlen=seqlen, nsamples=self.recipe.nsamples, seed=self.recipe.seed,
                                         skip_bad_samples=self.skip_bad_samples, **kw)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(self.tokenizer, "eos_token_id", 0) or 0
        samples = _pad_samples(calib.samples, pad_id)
        return calibration_batches(samples, self.recipe.batch_size, pad_token_id=pad_id, flat_keys=calib.flat_keys)


def build_quantizer(loaded: Any, **kwargs: Any) -> AutoRound:
    """The right facade for a `LoadedModel`: AutoRoundMLLM for multimodal models, else AutoRound."""
    mllm_only = ("extra_data_dir", "template", "quant_nontext_module")
    if loaded.is_multimodal:
        return AutoRoundMLLM(loaded.model, loaded.tokenizer, processor=loaded.processor, **kwargs)
    for key in mllm_only:
        value = kwargs.pop(key, None)
        if value not in (None, False):
            raise ValueError(f"--{key.replace('_', '-')} applies to multimodal models; {loaded.path} is a text model")
    return AutoRound(loaded.model, loaded.tokenizer, **kwargs)


def check_output_dir(output: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Fail before any work if `output` cannot be written: a non-empty directory without
    `overwrite`, a file, or a directory that is (or holds, or sits inside) one of `protect` (the
    input model: saving must never replace it)."""
    out = Path(output).resolve()
    for p in protect:
        src = Path(p).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"output {str(out)!r} overlaps the input model at {str(src)!r}; choose another "
                             "directory so the original model is never replaced")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} is not empty; pass --overwrite (overwrite=True) to "
                              "replace it, or choose a new path")
    return out
