"""`AutoRound` / `AutoRoundMLLM`: the one-object API, as AutoRound users know it.

    ar = AutoRoundMLLM(model, tokenizer, processor=processor, bits=4, group_size=128,
                       dataset="llava.json", extra_data_dir="images/")
    ar.quantize()
    ar.save_quantized("out/", format="auto_round", inplace=True)

The constructor checks its arguments (`arguments.py`: values, paths, then the loaded model's
layers) and turns them into one frozen `QuantizeConfig`, before any tuning: a bad spec, recipe value,
layer config, block name, dataset, image or template fails with a message naming what and where.
`quantize()` builds the calibration batches (`templating`), prints what it will do, runs the engine
(`quantize_model`) with a progress bar, and `save_quantized` exports. What block-wise tuning supports
per model family lives in `adapters/hf/families.py`, padding in `templating/collate.py`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import attrs
import torch
from torch import nn

from signround.adapters.engine import distributed, runtime
from signround.adapters.engine import planner as memory
from signround.adapters.engine.device import CACHE_PLACES, default_device, release_host_memory, resolve
from signround.adapters.engine.distributed import DataParallel
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.progress import BlockProgress, print_settings, print_summary
from signround.adapters.engine.report import LayerResult, QuantReport
from signround.adapters.engine.resume import ResumeStore, fingerprint
from signround.adapters.checkpoint.files import dir_lock
from signround.adapters.checkpoint.formats import DEFAULT_FORMAT, parse_formats
from signround.adapters.checkpoint.targets import check_targets, fit_plan
from signround.adapters.hf.blocks import LayerPlan, blocks_of, linear_shape, select_layers
from signround.adapters.hf.experts import unfuse_experts
from signround.adapters.frontends.arguments import (Dataset, check_device, check_layer_config, check_model,
                                                  check_output_dir, check_resume_dir, load_calibration_dataset,
                                                  read_layer_config, resolve_recipe)
from signround.adapters.frontends import mixed
from signround.adapters.hf.outside import outside_layers, round_outside
from signround.adapters.hf.families import block_lists, check_served, check_vision_blocks, model_type
from signround.adapters.hf.vision import ModalityWeights, check_loss_weighting, image_token_id
from signround.rounding import QuantSpec, Recipe
from signround.templating import (
    ConversationDataset,
    SelfGenerated,
    Template,
    TextDataset,
    conversation_calibration,
    conversation_texts,
    load_template,
    render,
    self_calibration,
    text_calibration_set,
)
from signround.templating.calibration import calibration_batches
from signround.templating.collate import pad_samples

MLLM_DEFAULT_SEQLEN = 512  # the reference's cap for image-text calibration
__all__ = ["AutoRound", "AutoRoundMLLM", "QuantizeConfig", "build_quantizer", "check_output_dir", "read_layer_config",
           "resolve_recipe"]  # the last three live in arguments.py; kept importable from here


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
    quant_nontext_module: also quantize the vision blocks; max_pixels: cap on image size;
    loss_weighting: image / text position weights of the text decoder's block loss (None = off).
    """

    processor: Any = None
    image_processor: Any = None
    extra_data_dir: Optional[Path] = None
    template: Optional[Template] = None
    quant_nontext_module: bool = False
    max_pixels: Optional[int] = None
    loss_weighting: Optional[ModalityWeights] = None


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
    the calibration data, where finished blocks are kept. Built (and checked) by the constructor.
    inputs: the files and folders the run reads (dataset, images, resume store), which a save must
    never replace."""

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
    inputs: tuple[Path, ...] = ()
    targets: tuple[str, ...] = ()
    formats: tuple[str, ...] = (DEFAULT_FORMAT,)
    outside: Mapping[str, QuantSpec] = attrs.field(factory=dict)  # named layers outside the blocks (lm_head): RTN
    stream: bool = False  # blocks are read from the model's checkpoint one at a time (quantize_and_save)
    memory: Optional[memory.MemoryPlan] = None  # the memory plan the budgets chose (None: no budget given)
    mixed: Optional[mixed.MixedRequest] = None  # target_bits: the plan is chosen when tuning starts (`mixed_plan`)
    loss_weighting: Optional[ModalityWeights] = None  # loss_weighting="modality": image/text position weights

    def plan(self, model: nn.Module) -> LayerPlan:
        return select_layers(model, self.block_names, self.spec, self.layer_config)

    def fingerprint(self, model: nn.Module, batches: Optional[list[dict[str, torch.Tensor]]]) -> str:
        """What makes two runs the same run: model config, grid, recipe, layers, blocks, data."""
        config = getattr(model, "config", None)
        parts = {"config": config.to_dict() if config is not None else type(model).__name__,
                 "spec": self.spec.to_dict(), "recipe": attrs.asdict(self.recipe),
                 "layer_config": {k: (v.to_dict() if isinstance(v, QuantSpec) else v)
                                  for k, v in self.layer_config.items()},
                 "blocks": list(self.block_names), "nontext": self.quant_nontext_module,
                 **({"modality": attrs.asdict(self.loss_weighting)} if self.loss_weighting is not None else {})}
        return fingerprint(parts, batches or ())


class AutoRound:
    """Quantize a text LLM (or the text decoder of a VLM on text) with SignRound.

    Arguments follow the reference: bits, group_size, sym; recipe ("default", "light", "best",
    "rtn" or a Recipe) with iters/lr/minmax_lr/nsamples/seqlen/batch_size/gradient_accumulate_steps/
    seed/enable_minmax_tuning/enable_quanted_input/amp/use_best overriding it; dataset (a path, "builtin" = the
    built-in text corpus and the default, "embedded" = built-in image-text, "self" = text the model
    generates, or a list of strings); layer_config ({name or regex: {bits, group_size, sym}}, bits 16
    = keep fp; every key must match a layer inside the blocks, or name one outside exactly, such as
    lm_head, which is then rounded to nearest);
    to_quant_block_names (block-list prefixes, or comma-separated regexes; discovered when not
    given); device; low_gpu_mem_usage (the activation cache on the host and, on an accelerator, each
    step's samples in sub-batches of at most 4096 tokens unless gradient_accumulate_steps is given:
    the same maths, summed in another order); resume_dir (keep finished blocks there); progress (a progress
    bar and a summary on stderr). multimodal: image-text options (AutoRoundMLLM fills them in).
    target: runtimes that must load the checkpoint ("vllm", "transformers", "signround",
    "llama.cpp"): an unloadable plan fails here, before any work, and vLLM's fused q/k/v and gate/up
    groups are given their strictest member's scheme (with a warning); format: the export format(s)
    `save_quantized` writes by default, checked against the targets. stream_from_disk: `model` is
    the skeleton `load_model(path, stream=True)` gives; each block is read from its checkpoint when
    its turn comes and written out as it finishes (`quantize_and_save`), so the model need not fit
    in RAM. max_gpu_memory / max_cpu_memory ("24GiB", bytes, or "auto": what the machine has): the
    memory planner picks settings that fit (cache placement, streaming when `model` is a skeleton,
    gradient accumulation with the same samples per step) or refuses, naming what would fit
    (`self.config.memory`, `memory_plan()`). target_bits (e.g. 3.0: stored bits per weight of the
    quantized layers, scales and zero points counted as `signround inspect` counts them),
    candidates (grids such as "W2G64", "W4G128", default `mixed.DEFAULT_CANDIDATES`), fuse_groups
    (vLLM's q/k/v and gate/up take one grid, default on), rescore (re-scoring rounds on the plan's
    RTN-quantized model, default `mixed.DEFAULT_RESCORE`): choose each layer's grid for the lowest
    estimated loss within the budget (spec/mixed-precision.md); an unreachable budget fails here,
    the search runs on the calibration data when tuning starts, or at `mixed_plan()`.
    The checked arguments are `self.config`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, bits: int = 4, group_size: int = 128,
                 sym: bool = True, recipe: Union[str, Recipe, None] = "default", dataset: Any = None,
                 iters: Optional[int] = None, lr: Optional[float] = None, minmax_lr: Optional[float] = None,
                 nsamples: Optional[int] = None, seqlen: Optional[int] = None, batch_size: Optional[int] = None,
                 gradient_accumulate_steps: Optional[int] = None, seed: Optional[int] = None,
                 enable_minmax_tuning: Optional[bool] = None, enable_quanted_input: Optional[bool] = None,
                 amp: Optional[bool] = None, use_best: Optional[bool] = None, device: Optional[str] = None,
                 low_gpu_mem_usage: bool = False,
                 cache: str = "auto", layer_config: Optional[Mapping[str, Any]] = None,
                 to_quant_block_names: Union[str, Sequence[str], None] = None,
                 skip_bad_samples: bool = False, resume_dir: str | Path | None = None,
                 progress: bool = True, multimodal: Optional[Multimodal] = None,
                 target: Union[str, Sequence[str]] = (), format: Union[str, Sequence[str]] = DEFAULT_FORMAT,
                 stream_from_disk: bool = False, max_gpu_memory: Union[int, str, None] = None,
                 max_cpu_memory: Union[int, str, None] = None, target_bits: Optional[float] = None,
                 candidates: Union[str, Sequence[Any], None] = None, fuse_groups: bool = True,
                 rescore: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module (a Hugging Face model), got {type(model).__name__}")
        mm = multimodal or Multimodal()
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        recipe_value = resolve_recipe(recipe, iters=iters, lr=lr, minmax_lr=minmax_lr, nsamples=nsamples,
                                      seqlen=seqlen, batch_size=batch_size,
                                      gradient_accumulate_steps=gradient_accumulate_steps, seed=seed,
                                      enable_minmax_tuning=enable_minmax_tuning,
                                      enable_quanted_input=enable_quanted_input, amp=amp, use_best=use_best)
        checked_layers = check_layer_config(layer_config)
        checked_device = check_device(device)
        if cache not in CACHE_PLACES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_PLACES)} (where the calibration activations live), "
                             f"got {cache!r}")
        resume = None if resume_dir is None else check_resume_dir(resume_dir)
        blocks = tuple(block_lists(model, to_quant_block_names, mm.quant_nontext_module))
        unfuse_experts(model, blocks)  # fused MoE experts: one Linear per expert matrix from here on
        check_model(model, blocks, spec, checked_layers, select_layers(model, blocks, spec, checked_layers))
        targets = check_targets([target] if isinstance(target, str) else target)
        check_served(model_type(model), targets)
        formats = parse_formats(format)
        outside = outside_layers(model, blocks, spec, checked_layers)
        checked_layers = _fit_targets(model, blocks, spec, checked_layers, targets, formats, outside)
        request, self._priced = _mixed_request(model, blocks, spec, checked_layers, outside, targets, formats,
                                               target_bits, candidates, fuse_groups, bool(stream_from_disk), rescore)
        data = load_calibration_dataset(dataset, recipe_value, mm.extra_data_dir, bool(skip_bad_samples))
        self._stream, memory_plan, recipe_value, cache = _plan_memory(
            model, blocks, select_layers(model, blocks, spec, checked_layers), recipe_value, checked_device,
            "host" if low_gpu_mem_usage and cache == "auto" else cache, bool(stream_from_disk), max_gpu_memory,
            max_cpu_memory)
        if low_gpu_mem_usage and memory_plan is None and gradient_accumulate_steps is None:
            # auto-round's flag trades time for accelerator memory; ours also cuts each step's samples
            # into small sub-batches (same samples, same maths) unless the user chose the split
            recipe_value = memory.low_memory_recipe(recipe_value, _tuning_device(checked_device).type)
        if self._stream is not None and isinstance(data, SelfGenerated):
            raise ValueError("dataset='self' generates text with the whole model, which a run streamed from disk "
                             "never holds; use a dataset (or the built-in one), or load the model in RAM")
        conversations = isinstance(data, ConversationDataset)
        template = mm.template
        if template is None and conversations:  # rendered to text with the family's preset
            template = load_template(None, model_type(model))
        images = multimodal is not None and conversations and any(s.images for s in data.samples)
        if isinstance(data, SelfGenerated) and tokenizer is None:
            raise ValueError("dataset='self' samples text from the model and needs its tokenizer; pass tokenizer=")
        source = Path(data.source) if data is not None and not isinstance(data, SelfGenerated) else None
        inputs = tuple(p for p in (source, mm.extra_data_dir, resume) if p is not None and p.exists())
        self.model = model
        self.tokenizer = tokenizer
        self.processor = mm.processor
        self.image_processor = mm.image_processor
        self.config = QuantizeConfig(
            spec=spec, recipe=recipe_value, block_names=blocks, layer_config=checked_layers,
            quant_nontext_module=mm.quant_nontext_module, loss_weighting=mm.loss_weighting, device=checked_device,
            low_gpu_mem_usage=bool(low_gpu_mem_usage), cache=cache, resume_dir=resume, progress=bool(progress),
            inputs=inputs, targets=targets, formats=formats, outside=outside, stream=self._stream is not None,
            memory=memory_plan, mixed=request,
            data=CalibrationData(dataset=data, template=template if conversations else None, images=images,
                                 image_seqlen=recipe_value.seqlen if seqlen is not None else MLLM_DEFAULT_SEQLEN,
                                 max_pixels=mm.max_pixels, skip_bad_samples=bool(skip_bad_samples)))
        self.report: Optional[QuantReport] = None
        self._data_parallel: Optional[DataParallel] = None
        self._mixed_plan: Optional[mixed.MixedPlan] = None
        self._calibrated: Optional[tuple[Any, dict[str, Any]]] = None  # batches the search read, reused to tune

    @property
    def block_names(self) -> list[str]:
        return list(self.config.block_names)

    # -- steps ------------------------------------------------------------------------------
    def plan(self) -> LayerPlan:
        """Which layers would be quantized with which grid, and which stay in full precision (and why)."""
        return self.config.plan(self.model)

    def mixed_plan(self) -> Optional[mixed.MixedPlan]:
        """With target_bits: score the candidates on the calibration data, solve the budget, and make
        the plan this run's layer_config (its most common grid the global one); None without
        target_bits. Computed once; `quantize()` calls it first."""
        request = self.config.mixed
        if request is None or self._mixed_plan is not None:
            return self._mixed_plan
        assert self._priced is not None
        if self._calibrated is None:
            self._calibrated = self._calibrate()
        batches = self._calibrated[0]
        if batches is None:
            raise ValueError("target_bits scores the layers on calibration data, and this run has none (plain RTN "
                             "without a dataset): pass dataset= (e.g. 'builtin')")
        cfg = self.config
        device = cfg.device if cfg.device is not None else str(default_device())
        plan = mixed.choose(self.model, batches, self._priced, request, device=device)
        before = self.plan().quantize
        chosen = plan.specs
        # every quantized layer pinned to its grid, so the new global grid changes none of them
        layers = {**cfg.layer_config, **{n: chosen.get(n, s) for n, s in before.items()}}
        fitted = _fit_targets(self.model, cfg.block_names, plan.global_spec, layers, cfg.targets, cfg.formats,
                              cfg.outside)
        self.config = attrs.evolve(cfg, spec=plan.global_spec, layer_config=fitted)
        self._mixed_plan = plan
        return plan

    def calibration(self) -> Optional[list[dict[str, torch.Tensor]]]:
        """Calibration batches for the model's forward (None for RTN without data)."""
        return self._calibrate()[0]

    def _calibrate(self, generate: bool = True) -> tuple[Optional[list[dict[str, torch.Tensor]]], dict[str, Any]]:
        """(batches, what they are: source, kind, samples × seqlen, distinct tokens, repeats).
        generate=False describes self-generated data without generating it (for a dry run)."""
        data, recipe = self.config.data, self.config.recipe
        if data.dataset is None:
            return None, {"source": None, "kind": "none: plain RTN rounds without data"}
        info: dict[str, Any] = {"source": data.dataset.source}
        if data.images:
            assert isinstance(data.dataset, ConversationDataset) and data.template is not None
            kw = {} if data.max_pixels is None else {"max_pixels": data.max_pixels}
            calib = conversation_calibration(data.dataset, data.template, tokenizer=self.tokenizer,
                                             processor=self.processor, seqlen=data.image_seqlen,
                                             nsamples=recipe.nsamples, seed=recipe.seed,
                                             skip_bad_samples=data.skip_bad_samples, **kw)
            lengths = [int(s["input_ids"].shape[-1]) for s in calib.samples]
            info.update(kind="image-text", samples=len(lengths), seqlen=data.image_seqlen,
                        distinct_tokens=sum(lengths), shorter=sum(n < max(lengths) for n in lengths),
                        dropped=len(calib.dropped))
            pad_id = _pad_token_id(self.tokenizer)
            return calibration_batches(pad_samples(calib.samples, pad_id, calib.padded_keys), recipe.batch_size,
                                       pad_token_id=pad_id, flat_keys=calib.flat_keys), info
        if self.tokenizer is None:
            raise ValueError("calibration needs the model's tokenizer; pass tokenizer=")
        info.update(kind="text", samples=recipe.nsamples, seqlen=recipe.seqlen)
        if isinstance(data.dataset, SelfGenerated):
            if not generate:
                return None, {**info, "note": "generated by the model when tuning starts"}
            text = self_calibration(self.model, self.tokenizer, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                                    seed=recipe.seed, batch_size=recipe.batch_size,
                                    temperature=data.dataset.temperature)
        else:
            docs = data.dataset
            if isinstance(docs, ConversationDataset):
                template = data.template
                assert template is not None
                docs = conversation_texts(docs, lambda turns: render(template, turns))
            text = text_calibration_set(docs.texts, self.tokenizer, seqlen=recipe.seqlen, nsamples=recipe.nsamples,
                                        seed=recipe.seed, source=docs.source)
        info.update(distinct_tokens=text.distinct_tokens, repeats=round(text.repeats, 2))
        return calibration_batches(list(text.samples), recipe.batch_size), info

    def settings(self, calibration: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """What the run does, before tuning: calibration (source, kind, samples × seqlen, distinct
        tokens), recipe, grid, layers, device and cache. Printed by `quantize()` and recorded in the
        report and the checkpoint's quantization_config (`signround_settings`)."""
        cfg, r = self.config, self.config.recipe
        plan = self.plan()
        fp = plan.fp_counts()
        dp = self._data_parallel
        accel = resolve(cfg.device if cfg.device is not None or dp is None else dp.device(), amp=r.amp,
                        low_gpu_mem_usage=cfg.low_gpu_mem_usage, cache=cfg.cache)
        out = {
            "calibration": dict(calibration if calibration is not None else self._calibrate(generate=False)[1]),
            "recipe": {"iters": r.iters, "lr": r.resolved_lr, "minmax_lr": r.resolved_minmax_lr,
                       "batch_size": r.batch_size, "gradient_accumulate_steps": r.gradient_accumulate_steps,
                       "nsamples": r.nsamples, "seqlen": r.seqlen, "seed": r.seed, "minmax_tuning":
                       r.enable_minmax_tuning, "quanted_input": r.enable_quanted_input, "use_best": r.use_best},
            "grid": cfg.spec.to_dict(),
            "layers": {"quantized": len(plan.quantize), "kept_fp": fp["layers"],
                       "other_weights_in_blocks": fp["other_in_blocks"], "blocks": ", ".join(cfg.block_names)},
            "device": {"device": str(accel.device),
                       "autocast": None if accel.autocast_dtype is None else str(accel.autocast_dtype).split(".")[-1],
                       "cache": (f"disk (memory-mapped files in {accel.cache_dir})" if accel.cache_dir is not None
                                 else str(accel.store_device) + (" (pinned, streamed ahead)" if accel.pinned_cache else "")),
                       "weights": "streamed from disk, one block at a time" if cfg.stream else "in memory"},
        }
        if cfg.loss_weighting is not None:
            out["loss_weighting"] = {"kind": "modality", **attrs.asdict(cfg.loss_weighting)}
        if cfg.mixed is not None:
            out["mixed_precision"] = (self._mixed_plan.summary() if self._mixed_plan is not None else
                                      {"target_bits": cfg.mixed.target_bits, "candidates": ", ".join(
                                          mixed.scheme_name(c) for c in cfg.mixed.candidates),
                                       "fuse_groups": cfg.mixed.fuse_groups, "plan": "chosen when tuning starts"})
        return out

    def quantize(self) -> QuantReport:
        """Tune every block (or round, for the `rtn` recipe); the model's weights become quantized.

        Under torchrun the process group starts here, and a step batch too small to split over the
        ranks is refused before any data is read. The resume store is locked while tuning."""
        if self.config.stream:
            raise ValueError("a run streamed from disk writes its checkpoint as the blocks finish: call "
                             "quantize_and_save(output_dir) instead of quantize() and save_quantized()")
        return self._quantize()

    def _quantize(self, sink: Any = None) -> QuantReport:
        """`quantize`, handing each finished block to `sink` (a streaming export) when given."""
        if self.report is not None:
            raise ValueError("this model is already quantized; build a new AutoRound for another run")
        self.mixed_plan()  # target_bits: the plan becomes the run's layer_config before anything reads it
        cfg = self.config
        dp = self._data_parallel = distributed.from_env()
        if dp is not None:
            runtime.check_ranks(cfg.recipe, dp.world)
            if cfg.stream:
                raise ValueError("streaming from disk runs in one process; under torchrun load the model in RAM")
        show = cfg.progress and (dp is None or dp.is_main)
        # Only the rank that writes holds the resume store's lock (every rank of a torchrun run reads it).
        writer = dp is None or dp.is_main
        lock = dir_lock(cfg.resume_dir, "resume_dir") if cfg.resume_dir is not None and writer else contextlib.nullcontext()
        with lock:
            batches, calibration = self._calibrated if self._calibrated is not None else self._calibrate()
            settings = self.settings(calibration)
            if show:
                print_settings(settings)
            resume = (None if cfg.resume_dir is None
                      else ResumeStore.open(cfg.resume_dir, cfg.fingerprint(self.model, batches)))
            device = cfg.device if cfg.device is not None or dp is None else dp.device()
            total = sum(len(blocks_of(self.model, p)) for p in cfg.block_names)
            plan = self.plan()
            try:
                with BlockProgress(total, cfg.recipe.iters, enabled=show) as bar, \
                        runtime.reporting_steps(bar.step if show else None):
                    _, report = quantize_model(self.model, batches, cfg.spec, cfg.recipe, layer_config=cfg.layer_config,
                                               block_names=cfg.block_names,
                                               quant_nontext_module=cfg.quant_nontext_module, device=device,
                                               low_gpu_mem_usage=cfg.low_gpu_mem_usage, cache=cfg.cache,
                                               on_block=bar.done if show else None, resume=resume, data_parallel=dp,
                                               stream=self._stream, sink=sink, loss_weighting=cfg.loss_weighting)
            except torch.OutOfMemoryError as err:
                r = cfg.recipe
                hints = [] if cfg.low_gpu_mem_usage else ["low_gpu_mem_usage=True keeps calibration activations "
                                                           "on the CPU"]
                if r.batch_size > 1:
                    hints.append(f"a smaller batch with accumulation, e.g. batch_size={max(1, r.batch_size // 2)} "
                                 f"gradient_accumulate_steps={r.gradient_accumulate_steps * 2} (same effective batch)")
                hints.append(f"fewer or shorter samples (nsamples={r.nsamples}, seqlen={r.seqlen} now)")
                raise MemoryError("out of memory on the accelerator while tuning. Options: " + "; ".join(hints)
                                  + f". ({str(err).splitlines()[0]})") from err
        _release_host_cache()  # the activation cache is gone: its heap and its pinned pages go back too
        layers = dict(report.layers)
        if cfg.outside:  # lm_head and other named layers outside the blocks: rounded to nearest
            layers.update({n: LayerResult(n, qw.spec, qw.scale, qw.zero)
                           for n, qw in round_outside(self.model, cfg.outside).items()})
        other = {k: why for k, why in plan.other_weights.items() if k.rsplit(".", 1)[0] not in cfg.outside}
        report = attrs.evolve(report, layers=layers, other_weights=other, settings=settings)
        if show:
            print_summary(report)
        self.report = report
        return report

    def _recorded_settings(self) -> dict[str, Any]:
        """What the checkpoint's quantization_config records of the run besides the grid and recipe:
        the dataset name (as auto-round writes it) and `signround_settings` (see `settings`)."""
        settings = dict(self.report.settings) if self.report is not None else {}
        source = settings.get("calibration", {}).get("source")
        return {"dataset": None if source is None else str(source), "signround_settings": settings or None}

    def save_quantized(self, output_dir: str | Path, format: Union[str, Sequence[str], None] = None,
                       inplace: bool = True, overwrite: bool = False,
                       max_shard_size: Union[int, str] = "5GB") -> Union[Path, dict[str, Path]]:
        """Write the checkpoint(s); the directory appears complete or not at all. format: default the
        constructor's; with `target=` every format must load on every target (checked before writing).
        `overwrite` replaces only a previous quantized checkpoint, and never the run's inputs (the
        model's directory, the dataset, the image folder, the resume store)."""
        from signround.adapters.checkpoint.export import save_quantized

        if self.report is None:
            raise ValueError("nothing to save yet: call quantize() first")
        source = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        model_dir = [source] if isinstance(source, str) and source and Path(source).is_dir() else []
        check_output_dir(output_dir, overwrite=overwrite, protect=model_dir, inputs=self.config.inputs)
        for name, layer in self.report.layers.items():
            if not bool(torch.isfinite(layer.scale.float()).all()):
                raise ValueError(f"layer {name!r} has NaN/Inf quantization scales; refusing to write a broken "
                                 "checkpoint (check the calibration data and the model's activations)")
        dp = self._data_parallel
        if dp is not None:
            # Every rank has checked the output before rank 0 writes it: a rank that reached its check
            # after rank 0's write would find the new checkpoint there and refuse it.
            dp.barrier()
            if not dp.is_main:  # every rank holds the same result; rank 0 writes it
                dp.barrier()
                return Path(output_dir)
        path = save_quantized(self.model, self.report.layers, output_dir,
                              format=self.config.formats if format is None else format, inplace=inplace,
                              tokenizer=self.tokenizer, processor=self.processor,
                              image_processor=self.image_processor,
                              block_name_to_quantize=list(self.report.block_name_to_quantize),
                              recipe=self.config.recipe, overwrite=overwrite, targets=self.config.targets,
                              max_shard_size=max_shard_size, extra_info=self._recorded_settings())
        if dp is not None:
            dp.barrier()
        return path

    def quantize_and_save(self, output_dir: str | Path, format: Union[str, Sequence[str], None] = None,
                          inplace: bool = True, overwrite: bool = False,
                          max_shard_size: Union[int, str] = "5GB") -> Union[Path, dict[str, Path]]:
        """`quantize()` then `save_quantized(...)`; a run streamed from disk instead writes each block
        as it finishes (one shard per block, `checkpoint/stream_writer.py`), into a temporary folder
        that becomes `output_dir` when the run is complete: a failed run leaves no partial output."""
        if not self.config.stream:
            self.quantize()
            return self.save_quantized(output_dir, format=format, inplace=inplace, overwrite=overwrite,
                                       max_shard_size=max_shard_size)
        from signround.adapters.checkpoint.export import format_dirname
        from signround.adapters.checkpoint.stream_writer import open_stream

        source = Path(self.model.config._name_or_path)
        check_output_dir(output_dir, overwrite=overwrite, protect=[source], inputs=self.config.inputs)
        formats = parse_formats(self.config.formats if format is None else format)
        specs = {**self.plan().quantize, **self.config.outside}
        with open_stream(output_dir, self.model, formats, specs, self.config.block_names, overwrite=overwrite) as writer:
            report = self._quantize(writer)
            writer.finish(report, recipe=self.config.recipe, extra_info=self._recorded_settings(),
                          tokenizer=self.tokenizer, processor=self.processor, image_processor=self.image_processor)
        out = Path(output_dir).resolve()
        return out if len(formats) == 1 else {f: out / format_dirname(f) for f in formats}

    def memory_plan(self) -> memory.MemoryPlan:
        """The memory plan of this run: the one the budgets chose, else the estimate of the settings
        as they are (no budget), for `--dry-run`."""
        if self.config.memory is not None:
            return self.config.memory
        cfg = self.config
        return _plan_memory_of(self.model, cfg.block_names, self.plan(), cfg.recipe, cfg.device, cfg.cache,
                               self._stream is not None, None, None)


def _release_host_cache() -> None:
    """After tuning: the freed heap, and on CUDA the pinned host blocks torch's caching host allocator
    keeps once the activation cache that used them is freed (they stay resident until emptied, so
    the export would run with the whole cache's RAM still held)."""
    release_host_memory()
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()


def _tuning_device(device: Optional[str]) -> torch.device:
    """The device blocks are tuned on: the one asked for, else the best available."""
    return torch.device(device) if device is not None else default_device()


def _plan_memory_of(model: nn.Module, blocks: Sequence[str], plan: LayerPlan, recipe: Recipe, device: Optional[str],
                    cache: str, stream: bool, max_gpu: Union[int, str, None],
                    max_cpu: Union[int, str, None]) -> memory.MemoryPlan:
    """The planner's choice for this model (a skeleton may stream) on `device` under the budgets."""
    dev = _tuning_device(device)
    budgets = [memory.parse_size(max_gpu), memory.parse_size(max_cpu)]
    if "auto" in budgets:
        machine = memory.machine_budgets(dev)
        budgets = [machine[k] if b == "auto" else b for k, b in enumerate(budgets)]
    skeleton = any(p.device.type == "meta" for p in model.parameters())
    return memory.choose(memory.ModelShape.of(model, blocks, plan), recipe, device_type=dev.type,
                         max_device=budgets[0], max_host=budgets[1], cache=cache,
                         stream=True if stream else (None if skeleton else False), can_stream=skeleton,
                         amp=recipe.amp, baseline=memory.current_rss(), model_in_baseline=not skeleton,
                         unread=0 if skeleton else memory.unread_mapped_bytes([*model.parameters(), *model.buffers()]))


def _plan_memory(model: nn.Module, blocks: Sequence[str], plan: LayerPlan, recipe: Recipe, device: Optional[str],
                 cache: str, stream_from_disk: bool, max_gpu: Union[int, str, None],
                 max_cpu: Union[int, str, None]) -> tuple[Any, Optional[memory.MemoryPlan], Recipe, str]:
    """(the streamed weights or None, the memory plan or None, the recipe and cache placement to run).

    A skeleton (weights on the meta device) has its checkpoint checked here, before any work: every
    shard present and whole, every tensor there. It streams when asked, or when the budgets need it;
    otherwise it is read into RAM whole (the model `from_pretrained` would have given)."""
    from signround.adapters.checkpoint.files import from_checkpoint_namer
    from signround.adapters.hf.streaming import StreamedWeights

    skeleton = any(p.device.type == "meta" for p in model.parameters())
    if stream_from_disk and not skeleton:
        raise ValueError("stream_from_disk=True reads each block from the model's checkpoint: pass the skeleton "
                         "load_model(path, stream=True) returns, not a model already loaded in memory")
    weights = None
    if skeleton:
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source or not Path(source).is_dir():
            raise ValueError("this model's weights are on the meta device and it names no checkpoint directory to "
                             "read them from; build it with load_model(path, stream=True)")
        weights = StreamedWeights.open(source, model, blocks, namer=from_checkpoint_namer)
        weights.load_outside()
    chosen = None
    if max_gpu is not None or max_cpu is not None:
        chosen = _plan_memory_of(model, blocks, plan, recipe, device, cache, stream_from_disk, max_gpu, max_cpu)
        st = chosen.settings
        recipe = attrs.evolve(recipe, batch_size=st.batch_size, gradient_accumulate_steps=st.gradient_accumulate_steps)
        cache = st.cache if cache == "auto" else cache
        stream_from_disk = st.stream
    if weights is not None and not stream_from_disk:
        weights.load_all()
        weights = None
    return weights, chosen, recipe, cache


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
                 quant_nontext_module: bool = False, max_pixels: Optional[int] = None,
                 loss_weighting: Optional[str] = None, modality_weights: Optional[Mapping[str, float]] = None,
                 **kwargs: Any) -> None:
        if processor is None and tokenizer is not None:
            processor = getattr(tokenizer, "processor", None)
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None:
            image_processor = getattr(processor, "image_processor", None)
        if extra_data_dir is not None and not Path(extra_data_dir).is_dir():
            raise FileNotFoundError(f"extra_data_dir {str(extra_data_dir)!r} is not a directory")
        family = model_type(model)
        multimodal = Multimodal(processor=processor, image_processor=image_processor,
                                extra_data_dir=None if extra_data_dir is None else Path(extra_data_dir),
                                template=load_template(template, family),
                                quant_nontext_module=bool(quant_nontext_module), max_pixels=max_pixels,
                                loss_weighting=check_loss_weighting(loss_weighting, modality_weights))
        if quant_nontext_module and kwargs.get("dataset") is None:
            kwargs["dataset"] = "embedded"
        super().__init__(model, tokenizer, multimodal=multimodal, **kwargs)
        if quant_nontext_module:
            check_vision_blocks(family, self.config.block_names)
        images = self.config.data.images
        if quant_nontext_module and not images:
            raise ValueError("quant_nontext_module=True tunes the vision blocks, which needs image-text data: "
                             "pass a llava JSON dataset with images (or no dataset for the built-in set)")
        if multimodal.loss_weighting is not None:
            image_token_id(model)
        if multimodal.loss_weighting is not None and not images:
            raise ValueError("loss_weighting='modality' weights image-token positions in the text decoder's loss, "
                             "which needs image-text calibration: pass a llava JSON dataset with images (or "
                             "dataset='embedded')")
        if images and processor is None:
            raise ValueError("this dataset has images, which need the model's processor: pass processor= "
                             "(e.g. AutoProcessor.from_pretrained(path))")


def _fit_targets(model: nn.Module, blocks: Sequence[str], spec: QuantSpec, layer_config: Mapping[str, Any],
                 targets: Sequence[str], formats: Sequence[str], outside: Mapping[str, QuantSpec]) -> dict[str, Any]:
    """layer_config adjusted so every target loads the plan (`checkpoint.targets.fit_plan`: vLLM's
    fused groups share their strictest scheme), one warning per change; UnloadableError otherwise."""
    plan = select_layers(model, blocks, spec, layer_config)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in [*plan.quantize, *plan.skipped, *outside]}
    fit = fit_plan(targets, formats, shapes, {**plan.quantize, **outside}, blocks)
    for message in fit.messages:
        warnings.warn(message, stacklevel=3)
    return {**layer_config, **{n: {"bits": 16} if s is None else s for n, s in fit.changes.items()}}


def _mixed_request(model: nn.Module, blocks: Sequence[str], spec: QuantSpec, layer_config: Mapping[str, Any],
                   outside: Mapping[str, QuantSpec], targets: Sequence[str], formats: Sequence[str],
                   target_bits: Optional[float], candidates: Union[str, Sequence[Any], None], fuse_groups: bool,
                   stream: bool, rescore: Optional[int] = None
                   ) -> tuple[Optional[mixed.MixedRequest], Optional[mixed.Priced]]:
    """The checked mixed-precision request and its prices (None, None without target_bits); an
    unreachable budget, a candidate the format refuses or a layer no candidate fits fail here."""
    if target_bits is None:
        if candidates is not None or not fuse_groups or rescore is not None:
            raise ValueError("candidates=, fuse_groups= and rescore= choose grids at a bit budget: pass target_bits= "
                             "too (e.g. target_bits=3.0)")
        return None, None
    request = mixed.MixedRequest.of(target_bits, candidates, fuse_groups, rescore)
    if stream or any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("target_bits scores every layer with the whole model in memory, so it cannot run on a "
                         "model streamed from disk; load the model in RAM, or pass the plan of an earlier run as "
                         "layer_config")
    from signround.adapters.engine import env

    if env.read().world_size > 1:  # every rank must tune the same plan, and scores may differ in the last bit
        raise ValueError("target_bits under torchrun: choose the plan in one process first (signround quantize "
                         "--dry-run --target-bits … --plan-out plan.json), then run torchrun with --layer-config "
                         "plan.json")
    if "vllm" in targets and not request.fuse_groups:
        raise ValueError("fuse_groups=False lets q/k/v and gate/up take different grids, which vLLM cannot load "
                         "(target='vllm'); keep fuse_groups=True or drop the vllm target")
    priced = mixed.price(model, blocks, select_layers(model, blocks, spec, layer_config), layer_config, outside,
                         request, formats[0])
    mixed.check_reachable(priced, request)
    return request, priced


def build_quantizer(loaded: Any, **kwargs: Any) -> AutoRound:
    """The right facade for a `LoadedModel`: AutoRoundMLLM for multimodal models, else AutoRound."""
    mllm_only = ("extra_data_dir", "template", "quant_nontext_module", "loss_weighting", "modality_weights")
    if loaded.is_multimodal:
        return AutoRoundMLLM(loaded.model, loaded.tokenizer, processor=loaded.processor, **kwargs)
    for key in mllm_only:
        value = kwargs.pop(key, None)
        if value not in (None, False):
            raise ValueError(f"--{key.replace('_', '-')} applies to multimodal models; {loaded.path} is a text model")
    return AutoRound(loaded.model, loaded.tokenizer, **kwargs)
