"""`AutoRound` / `AutoRoundMLLM`: the one-object API, as AutoRound users know it.

    ar = AutoRoundMLLM(model, tokenizer, processor=processor, bits=4, group_size=128,
                       dataset="llava.json", extra_data_dir="images/")
    ar.quantize()
    ar.save_quantized("out/", format="auto_round", inplace=True)

The constructor turns its arguments into one frozen `QuantizeConfig` and checks them there, before
any tuning: a bad spec, recipe value, layer config, block name, dataset, image or template fails
with a message naming what and where. `quantize()` builds the calibration batches (`templating`),
runs the engine (`quantize_model`) with a progress bar, and `save_quantized` exports. What block-wise
tuning supports per model family lives in `adapters/hf/families.py`, padding in `templating/collate.py`.
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
from signround.adapters.engine.device import CACHE_PLACES
from signround.adapters.engine.distributed import DataParallel
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.progress import BlockProgress, print_summary
from signround.adapters.engine.report import QuantReport
from signround.adapters.engine.resume import ResumeStore, check_dir, fingerprint
from signround.adapters.checkpoint.formats import DEFAULT_FORMAT, parse_formats
from signround.adapters.checkpoint.targets import check_targets, fit_plan
from signround.adapters.hf.blocks import LayerPlan, blocks_of, linear_shape, select_layers
from signround.adapters.hf.families import block_lists, check_image_calibration, check_vision_blocks, model_type
from signround.rounding import QuantSpec, Recipe, preset
from signround.templating import (
    ConversationDataset,
    Template,
    TextDataset,
    conversation_calibration,
    conversation_texts,
    load_dataset,
    load_template,
    render,
    text_calibration,
)
from signround.templating.calibration import calibration_batches
from signround.templating.collate import pad_samples

LAYER_CONFIG_KEYS = {"bits", "group_size", "sym", "data_type"}
RECIPE_FIELDS = {f.name for f in attrs.fields(Recipe)}
MLLM_DEFAULT_SEQLEN = 512  # the reference's cap for image-text calibration

Dataset = Union[TextDataset, ConversationDataset]


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


def _check_finite_weights(model: nn.Module, plan: LayerPlan) -> None:
    """NaN/Inf in a weight to be quantized would poison its scale: refuse before any work."""
    modules = dict(model.named_modules())
    for name in plan.quantize:
        weight = getattr(modules[name], "weight", None)
        if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"layer {name!r} has {bad} NaN/Inf weight value(s); the model file is damaged or was "
                             "loaded in a dtype that overflows (try dtype=float32/bfloat16), or keep the layer "
                             f"in full precision with layer_config={{{name!r}: {{'bits': 16}}}}")


def _load_dataset(dataset: Any, recipe: Recipe, extra_data_dir: Optional[Path],
                  skip_bad_samples: bool) -> Optional[Dataset]:
    if recipe.is_rtn and dataset is None:
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
        return load_dataset(dataset, extra_data_dir=extra_data_dir, skip_bad_samples=skip_bad_samples)
    raise ValueError(f"dataset must be a path, a dataset name, or a list of strings, got {type(dataset).__name__}")


def _pad_token_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", 0) or 0
    return pad_id


@attrs.frozen
class Multimodal:
    """What AutoRoundMLLM adds to AutoRound's arguments (it passes this value explicitly).

    processor / image_processor: the model's (saved beside the checkpoint); extra_data_dir: where a
    dataset's image paths resolve; template: the chat template conversations are rendered with;
    quant_nontext_module: also quantize the vision blocks; max_pixels: cap on image size.
    """

    processor: Any = None
    image_processor: Any = None
    extra_data_dir: Optional[Path] = None
    template: Optional[Template] = None
    quant_nontext_module: bool = False
    max_pixels: Optional[int] = None


@attrs.frozen
class CalibrationData:
    """Where the calibration batches come from.

    dataset: None for RTN without data. template: renders conversations (None for text data).
    images: calibrate on image-text through the processor (a multimodal run on a dataset with
    images); image_seqlen: tokens per image-text sample. max_pixels, skip_bad_samples: as given.
    """

    dataset: Optional[Dataset]
    template: Optional[Template] = None
    images: bool = False
    image_seqlen: int = MLLM_DEFAULT_SEQLEN
    max_pixels: Optional[int] = None
    skip_bad_samples: bool = False


@attrs.frozen
class QuantizeConfig:
    """Everything a facade run is: the grid, the recipe, which layers and blocks, where it runs,
    the calibration data, where finished blocks are kept. Built (and checked) by the constructor."""

    spec: QuantSpec
    recipe: Recipe
    block_names: tuple[str, ...]
    data: CalibrationData
    layer_config: Mapping[str, Any] = attrs.field(factory=dict)
    quant_nontext_module: bool = False
    device: Optional[str] = None
    low_gpu_mem_usage: bool = False
    cache: str = "auto"
    resume_dir: Optional[Path] = None
    progress: bool = True
    targets: tuple[str, ...] = ()
    formats: tuple[str, ...] = (DEFAULT_FORMAT,)

    def plan(self, model: nn.Module) -> LayerPlan:
        return select_layers(model, self.block_names, self.spec, self.layer_config)

    def fingerprint(self, model: nn.Module, batches: Optional[list[dict[str, torch.Tensor]]]) -> str:
        """What makes two runs the same run: model config, grid, recipe, layers, blocks, data."""
        config = getattr(model, "config", None)
        parts = {"config": config.to_dict() if config is not None else type(model).__name__,
                 "spec": self.spec.to_dict(), "recipe": attrs.asdict(self.recipe),
                 "layer_config": {k: (v.to_dict() if isinstance(v, QuantSpec) else v)
                                  for k, v in self.layer_config.items()},
                 "blocks": list(self.block_names), "nontext": self.quant_nontext_module}
        return fingerprint(parts, batches or ())


class AutoRound:
    """Quantize a text LLM (or the text decoder of a VLM on text) with SignRound.

    Arguments follow the reference: bits, group_size, sym; recipe ("default", "light", "best",
    "rtn" or a Recipe) with iters/lr/minmax_lr/nsamples/seqlen/batch_size/gradient_accumulate_steps/
    seed/enable_minmax_tuning/enable_quanted_input/amp overriding it; dataset (a path, "embedded", or
    a list of strings); layer_config ({name or regex: {bits, group_size, sym}}, bits 16 = keep fp);
    to_quant_block_names (block-list prefixes, or comma-separated regexes; discovered when not
    given); device; low_gpu_mem_usage; resume_dir (keep finished blocks there); progress (a progress
    bar and a summary on stderr). multimodal: image-text options (AutoRoundMLLM fills them in).
    target: runtimes that must load the checkpoint ("vllm", "transformers", "signround",
    "llama.cpp"): an unloadable plan fails here, before any work, and vLLM's fused q/k/v and gate/up
    groups are given their strictest member's scheme (with a warning); format: the export format(s)
    `save_quantized` writes by default, checked against the targets. The checked arguments are
    `self.config`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, bits: int = 4, group_size: int = 128,
                 sym: bool = True, recipe: Union[str, Recipe, None] = "default", dataset: Any = None,
                 iters: Optional[int] = None, lr: Optional[float] = None, minmax_lr: Optional[float] = None,
                 nsamples: Optional[int] = None, seqlen: Optional[int] = None, batch_size: Optional[int] = None,
                 gradient_accumulate_steps: Optional[int] = None, seed: Optional[int] = None,
                 enable_minmax_tuning: Optional[bool] = None, enable_quanted_input: Optional[bool] = None,
                 amp: Optional[bool] = None, device: Optional[str] = None, low_gpu_mem_usage: bool = False,
                 cache: str = "auto", layer_config: Optional[Mapping[str, Any]] = None,
                 to_quant_block_names: Union[str, Sequence[str], None] = None,
                 skip_bad_samples: bool = False, resume_dir: str | Path | None = None,
                 progress: bool = True, multimodal: Optional[Multimodal] = None,
                 target: Union[str, Sequence[str]] = (), format: Union[str, Sequence[str]] = DEFAULT_FORMAT) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
        mm = multimodal or Multimodal()
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        recipe_value = resolve_recipe(recipe, iters=iters, lr=lr, minmax_lr=minmax_lr, nsamples=nsamples,
                                      seqlen=seqlen, batch_size=batch_size,
                                      gradient_accumulate_steps=gradient_accumulate_steps, seed=seed,
                                      enable_minmax_tuning=enable_minmax_tuning,
                                      enable_quanted_input=enable_quanted_input, amp=amp)
        checked_layers = _check_layer_config(layer_config)
        checked_device = _check_device(device)
        if cache not in CACHE_PLACES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_PLACES)} (where the calibration activations live), "
                             f"got {cache!r}")
        resume = None if resume_dir is None else check_dir(resume_dir)
        blocks = tuple(block_lists(model, to_quant_block_names, mm.quant_nontext_module))
        targets = check_targets([target] if isinstance(target, str) else target)
        formats = parse_formats(format)
        if targets:
            checked_layers = _fit_targets(model, blocks, spec, checked_layers, targets, formats)
        _check_finite_weights(model, select_layers(model, blocks, spec, checked_layers))
        data = _load_dataset(dataset, recipe_value, mm.extra_data_dir, bool(skip_bad_samples))
        conversations = isinstance(data, ConversationDataset)
        template = mm.template
        if template is None and conversations:  # rendered to text with the family's preset
            template = load_template(None, model_type(model))
        images = multimodal is not None and conversations and any(s.images for s in data.samples)
        self.model = model
        self.tokenizer = tokenizer
        self.processor = mm.processor
        self.image_processor = mm.image_processor
        self.config = QuantizeConfig(
            spec=spec, recipe=recipe_value, block_names=blocks, layer_config=checked_layers,
            quant_nontext_module=mm.quant_nontext_module, device=checked_device,
            low_gpu_mem_usage=bool(low_gpu_mem_usage), cache=cache, resume_dir=resume, progress=bool(progress),
            targets=targets, formats=formats,
            data=CalibrationData(dataset=data, template=template if conversations else None, images=images,
                                 image_seqlen=recipe_value.seqlen if seqlen is not None else MLLM_DEFAULT_SEQLEN,
                                 max_pixels=mm.max_pixels, skip_bad_samples=bool(skip_bad_samples)))
        self.report: Optional[QuantReport] = None
        self._data_parallel: Optional[DataParallel] = None

    @property
    def block_names(self) -> list[str]:
        return list(self.config.block_names)

    # -- steps ------------------------------------------------------------------------------
    def plan(self) -> LayerPlan:
        """Which layers would be quantized with which grid, and which stay in full precision (and why)."""
        return self.config.plan(self.model)

    def calibration(self) -> Optional[list[dict[str, torch.Tensor]]]:
        """Calibration batches for the model's forward (None for RTN without data)."""
        data, recipe = self.config.data, self.config.recipe
        if data.dataset is None:
            return None
        if data.images:
            assert isinstance(data.dataset, ConversationDataset) and data.template is not None
            kw = {} if data.max_pixels is None else {"max_pixels": data.max_pixels}
            calib = conversation_calibration(data.dataset, data.template, tokenizer=self.tokenizer,
                                             processor=self.processor, seqlen=data.image_seqlen,
                                             nsamples=recipe.nsamples, seed=recipe.seed,
                                             skip_bad_samples=data.skip_bad_samples, **kw)
            pad_id = _pad_token_id(self.tokenizer)
            return calibration_batches(pad_samples(calib.samples, pad_id), recipe.batch_size, pad_token_id=pad_id,
                                       flat_keys=calib.flat_keys)
        if self.tokenizer is None:
            raise ValueError("calibration needs the model's tokenizer; pass tokenizer=")
        docs = data.dataset
        if isinstance(docs, ConversationDataset):
            template = data.template
            assert template is not None
            docs = conversation_texts(docs, lambda turns: render(template, turns))
        samples = text_calibration(docs.texts, self.tokenizer, seqlen=recipe.seqlen, nsamples=recipe.nsamples,
                                   seed=recipe.seed)
        return calibration_batches(samples, recipe.batch_size)

    def quantize(self) -> QuantReport:
        """Tune every block (or round, for the `rtn` recipe); the model's weights become quantized.

        Under torchrun the process group starts here, and a step batch too small to split over the
        ranks is refused before any data is read."""
        if self.report is not None:
            raise ValueError("this model is already quantized; build a new AutoRound for another run")
        cfg = self.config
        dp = self._data_parallel = distributed.from_env()
        if dp is not None:
            runtime.check_ranks(cfg.recipe, dp.world)
        batches = self.calibration()
        resume = (None if cfg.resume_dir is None
                  else ResumeStore.open(cfg.resume_dir, cfg.fingerprint(self.model, batches)))
        device = cfg.device if cfg.device is not None or dp is None else dp.device()
        show = cfg.progress and (dp is None or dp.is_main)
        total = sum(len(blocks_of(self.model, p)) for p in cfg.block_names)
        try:
            with BlockProgress(total, enabled=show) as bar:
                _, report = quantize_model(self.model, batches, cfg.spec, cfg.recipe, layer_config=cfg.layer_config,
                                           block_names=cfg.block_names, quant_nontext_module=cfg.quant_nontext_module,
                                           device=device, low_gpu_mem_usage=cfg.low_gpu_mem_usage,
                                           cache=cfg.cache, on_block=bar.done if show else None, resume=resume, data_parallel=dp)
        except torch.OutOfMemoryError as err:
            r = cfg.recipe
            hints = [] if cfg.low_gpu_mem_usage else ["low_gpu_mem_usage=True (--low-gpu-mem-usage) keeps "
                                                       "calibration activations on the CPU"]
            if r.batch_size > 1:
                hints.append(f"a smaller batch with accumulation, e.g. batch_size={max(1, r.batch_size // 2)} "
                             f"gradient_accumulate_steps={r.gradient_accumulate_steps * 2} (same effective batch)")
            hints.append(f"fewer or shorter samples (nsamples={r.nsamples}, seqlen={r.seqlen} now)")
            raise MemoryError("out of memory on the accelerator while tuning. Options: " + "; ".join(hints)
                              + f". ({str(err).splitlines()[0]})") from err
        if show:
            print_summary(report)
        self.report = report
        return report

    def save_quantized(self, output_dir: str | Path, format: Union[str, Sequence[str], None] = None,
                       inplace: bool = True, overwrite: bool = False) -> Union[Path, dict[str, Path]]:
        """Write the checkpoint(s); the directory appears complete or not at all. format: default the
        constructor's; with `target=` every format must load on every target (checked before writing)."""
        from signround.adapters.checkpoint.export import save_quantized

        if self.report is None:
            raise ValueError("nothing to save yet: call quantize() first")
        for name, layer in self.report.layers.items():
            if not bool(torch.isfinite(layer.scale.float()).all()):
                raise ValueError(f"layer {name!r} has NaN/Inf quantization scales; refusing to write a broken "
                                 "checkpoint (check the calibration data and the model's activations)")
        dp = self._data_parallel
        if dp is not None and not dp.is_main:  # every rank holds the same result; rank 0 writes it
            dp.barrier()
            return Path(output_dir)
        path = save_quantized(self.model, self.report.layers, output_dir,
                              format=self.config.formats if format is None else format, inplace=inplace,
                              tokenizer=self.tokenizer, processor=self.processor,
                              image_processor=self.image_processor,
                              block_name_to_quantize=list(self.report.block_name_to_quantize),
                              recipe=self.config.recipe, overwrite=overwrite, targets=self.config.targets)
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
        if image_processor is None:
            image_processor = getattr(processor, "image_processor", None)
        if extra_data_dir is not None and not Path(extra_data_dir).is_dir():
            raise FileNotFoundError(f"extra_data_dir {str(extra_data_dir)!r} is not a directory")
        family = model_type(model)
        if quant_nontext_module:
            check_vision_blocks(family)
        multimodal = Multimodal(processor=processor, image_processor=image_processor,
                                extra_data_dir=None if extra_data_dir is None else Path(extra_data_dir),
                                template=load_template(template, family),
                                quant_nontext_module=bool(quant_nontext_module), max_pixels=max_pixels)
        if quant_nontext_module and kwargs.get("dataset") is None:
            kwargs["dataset"] = "embedded"
        super().__init__(model, tokenizer, multimodal=multimodal, **kwargs)
        images = self.config.data.images
        if quant_nontext_module and not images:
            raise ValueError("quant_nontext_module=True tunes the vision blocks, which needs image-text data: "
                             "pass a llava JSON dataset with images (or no dataset for the built-in set)")
        if images:
            check_image_calibration(family)
        if images and processor is None:
            raise ValueError("this dataset has images, which need the model's processor: pass processor= "
                             "(e.g. AutoProcessor.from_pretrained(path))")


def _fit_targets(model: nn.Module, blocks: Sequence[str], spec: QuantSpec, layer_config: Mapping[str, Any],
                 targets: Sequence[str], formats: Sequence[str]) -> dict[str, Any]:
    """layer_config adjusted so every target loads the plan (`checkpoint.targets.fit_plan`: vLLM's
    fused groups share their strictest scheme), one warning per change; UnloadableError otherwise."""
    plan = select_layers(model, blocks, spec, layer_config)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in [*plan.quantize, *plan.skipped]}
    fit = fit_plan(targets, formats, shapes, plan.quantize, blocks)
    for message in fit.messages:
        warnings.warn(message, stacklevel=3)
    return {**layer_config, **{n: {"bits": 16} if s is None else s for n, s in fit.changes.items()}}


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
