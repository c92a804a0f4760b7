"""`quantize_model`: capture → for each block: fp targets, tune, write back → next block.

    model, report = quantize_model(model, batches, QuantSpec(bits=4, group_size=128), preset("default"))

Per block list (vision lists first when included, then the text decoder): capture the inputs of
every block once; then for each block compute its full-precision outputs B_fp(X_fp) once (the
targets, and the next block's fp inputs), tune the rounding of its layers on X_q (the quantized
chain, `enable_quanted_input`) or X_fp, fix its weights to the quantized values, and feed
B_q(X_q) to the next block. RTN (iters 0) takes the same path, or, without calibration data,
just rounds every layer.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Iterator, Mapping, Optional

import attrs
import torch
from torch import Tensor, nn

from signround.adapters.hf.blocks import LayerOverride, LayerPlan, blocks_of, find_block_lists, select_layers
from signround.adapters.hf.capture import Batch, CapturedInputs, capture_inputs
from signround.adapters.engine.device import Accelerator, peak_memory, reset_peak_memory, resolve, synchronize
from signround.adapters.engine.progress import BlockProgress, print_summary
from signround.adapters.hf.pure import PureBlock, as_pure, weight_name, write_back
from signround.adapters.engine.report import BlockReport, LayerResult, QuantReport
from signround.adapters.engine.distributed import DataParallel
from signround.adapters.engine.resume import ResumeStore
from signround.adapters.engine import runtime
from signround.rounding import BlockInputs, QuantSpec, QuantizedWeight, Recipe, masked_mse, quantize_weight


Placement = list[tuple[nn.Module, str, bool, torch.device]]


def _move_outside(model: nn.Module, prefixes: Iterable[str], device: torch.device) -> Placement:
    """Move every parameter and buffer that is not inside the block lists to `device`; returns
    where each one was, for `_restore` (a model dispatched over several devices keeps its map)."""
    skip = tuple(p + "." for p in prefixes)
    moved: Placement = []
    for name, module in model.named_modules():
        if name.startswith(skip) or any(name == p[:-1] for p in skip):
            continue
        for key, p in list(module._parameters.items()):
            if p is not None and p.device != device:
                moved.append((module, key, True, p.device))
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                moved.append((module, key, False, b.device))
                module._buffers[key] = b.to(device)
    return moved


def _restore(moved: Placement) -> None:
    for module, key, is_param, device in moved:
        if is_param:
            p = module._parameters[key]
            if p is not None:
                p.data = p.data.to(device)
        elif module._buffers.get(key) is not None:
            module._buffers[key] = module._buffers[key].to(device)


def _check_materialized(model: nn.Module) -> None:
    """Weights offloaded by accelerate (on the meta device, read from disk/CPU by hooks) cannot be
    tuned in place: say so before any work is done."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"parameter {name!r} is on the meta device (offloaded by accelerate's device_map / "
                             "offload_folder); load the model without disk offload (device_map=None or 'cpu', "
                             "blocks then move to the GPU one at a time) to quantize it")


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """The block on `device` for the duration, back where it lives afterwards (on errors too).
    accelerate's AlignDevicesHooks inside it point at `device` meanwhile: a device_map may have put
    the block on another GPU, and its hook would move the inputs back there."""
    home = next(block.parameters()).device
    saved = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "execution_device", None) is not None:
                saved.append((h, h.execution_device))
                h.execution_device = device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)
        for h, dev in saved:
            h.execution_device = dev


@torch.no_grad()
def run_block(fn: PureBlock, weights: Mapping[str, Tensor], inputs: BlockInputs, accel: Accelerator,
              batch_size: int, targets: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
              keep_outputs: bool = True) -> tuple[Optional[Tensor], Optional[float]]:
    """Outputs of the block on every sample (on the store device, cache dtype) and, when `targets`
    are given, the mean squared error to them over all samples.

    out: write the outputs into this tensor (it may be `inputs.hidden` itself: each mini-batch is
    read before its rows are overwritten), so no second copy of the activations is made.
    keep_outputs=False: only the loss (returns None for the outputs)."""
    n = inputs.num_samples
    total = torch.zeros((), dtype=torch.float64, device=accel.device) if targets is not None else None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        batch = runtime.select(inputs, idx, accel.device)
        y = fn(weights, batch)
        if targets is not None:
            tgt = targets[start:start + idx.numel()].to(accel.device, non_blocking=True)
            total += masked_mse(y, tgt, batch.loss_mask).double() * idx.numel()
        if keep_outputs:
            if out is None:
                out = torch.empty((n, *y.shape[1:]), dtype=accel.cache_dtype or y.dtype, device=accel.store_device)
            out[start:start + idx.numel()].copy_(y, non_blocking=True)
        del y, batch
        if accel.after_step is not None:
            accel.after_step()
    loss = float(total) / n if (total is not None and n) else None  # one host sync per pass
    return (out if keep_outputs else None), loss


def quantize_weights(weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
                     quantized: Optional[Mapping[str, QuantizedWeight]], names: Mapping[str, str],
                     ) -> tuple[dict[str, Tensor], dict[str, LayerResult]]:
    """Quantized weights (dequantized, in the weight's dtype) and LayerResults for every layer in
    `specs` (weight name → spec); `quantized` None = RTN, else the tuned codes/scales per weight
    name; `names`: weight name → full layer name."""
    qweights, results = {}, {}
    for key, spec in specs.items():
        w = weights[key]
        q = quantize_weight(w, spec) if quantized is None else quantized[key]
        qweights[key] = q.dequantize(w.dtype)
        layer = key.rsplit(".", 1)[0]
        results[layer] = LayerResult(name=names[key], spec=spec, scale=q.scale.cpu(), zero=q.zero.cpu())
    return qweights, results


def _block_specs(plan: LayerPlan, block_prefix: str) -> tuple[dict[str, QuantSpec], dict[str, str]]:
    """(weight name inside the block → spec, weight name → full layer name) for one block."""
    specs, names = {}, {}
    for layer, spec in plan.quantize.items():
        if layer.startswith(block_prefix + "."):
            key = weight_name(layer[len(block_prefix) + 1:])
            specs[key], names[key] = spec, layer
    return specs, names


def _compile_block() -> bool:
    """Compile the block forward too (SIGNROUND_COMPILE_BLOCK=1); the qdq/update compile is separate."""
    return os.environ.get("SIGNROUND_COMPILE_BLOCK", "0").strip().lower() in ("1", "true", "yes", "on")


def _block_targets(block: nn.Module, captured: CapturedInputs, index: int, x_fp: Tensor, x_q: Tensor,
                   quantized: bool, recipe: Recipe, accel: Accelerator,
                   ) -> tuple[PureBlock, dict[str, Tensor], BlockInputs, Tensor]:
    """The block as a pure function, its weights, its (quantized-chain) inputs, and its fp outputs
    B_fp(X_fp) — the targets, written over X_fp's buffer when the chains are separate."""
    call = captured.calls[index]
    assert call is not None
    compile_block = accel.device.type == "cuda" and _compile_block() and quantized and recipe.iters > 0
    fn, weights = as_pure(block, call.layout, autocast_dtype=accel.autocast_dtype, compile=compile_block)
    inputs_fp = captured.block_inputs(index, x_fp)
    inputs_q = captured.block_inputs(index, x_q) if recipe.enable_quanted_input else inputs_fp
    inplace = recipe.enable_quanted_input and x_fp is not x_q
    targets, _ = run_block(fn, weights, inputs_fp, accel, recipe.batch_size, out=x_fp if inplace else None)
    return fn, weights, inputs_q, targets


def _tune_one(block: nn.Module, captured: CapturedInputs, index: int, x_fp: Tensor, x_q: Tensor,
              specs: Mapping[str, QuantSpec], names: Mapping[str, str], recipe: Recipe, accel: Accelerator,
              data_parallel: Optional[DataParallel] = None,
              ) -> tuple[Tensor, Tensor, dict[str, LayerResult], Optional[float], Optional[float]]:
    """Tune one block. Memory: with `enable_quanted_input`, the targets B_fp(X_fp) overwrite X_fp's
    buffer and B_q(X_q) overwrites X_q's, so only two activation sets ever live at once."""
    fn, weights, inputs_q, targets = _block_targets(block, captured, index, x_fp, x_q, bool(specs), recipe, accel)
    if not bool(torch.isfinite(targets).all()):
        raise FloatingPointError(f"block {captured.prefix}.{index} produces NaN/Inf activations in full precision "
                                 "on the calibration data; check the model's weights, or load it in bfloat16/float32 "
                                 "instead of float16 (overflow)")
    out = x_q if recipe.enable_quanted_input else None
    bs = recipe.batch_size
    if not specs:
        out_q, loss = run_block(fn, weights, inputs_q, accel, bs, targets, out=out)
        return targets, out_q, {}, loss, loss
    rtn_weights, rtn_results = quantize_weights(weights, specs, None, names)
    _, loss_rtn = run_block(fn, {**weights, **rtn_weights}, inputs_q, accel, bs, targets, keep_outputs=False)
    tuned = runtime.tune(fn, weights, specs, inputs_q, targets, recipe, accel, data_parallel)
    bad = (~torch.isfinite(tuned.losses)).nonzero()
    if bad.numel():
        raise FloatingPointError(f"block {captured.prefix}.{index}: the tuning loss became NaN/Inf at iteration "
                                 f"{int(bad[0])} (layers {sorted(names.values())[:3]}…); try recipe 'rtn' for this "
                                 "model, a smaller lr, or float32 activations (amp=False)")
    qweights, results = quantize_weights(weights, specs, tuned.quantized, names)
    _, loss_tuned = run_block(fn, {**weights, **qweights}, inputs_q, accel, bs, targets, keep_outputs=False)
    if recipe.use_best and loss_rtn is not None and loss_tuned is not None and loss_tuned > loss_rtn:
        # The best iterate is picked on mini-batch losses; on all samples RTN (iteration 0) can still
        # be better, and then it is the best iterate: keep it.
        qweights, results, loss_tuned = rtn_weights, rtn_results, loss_rtn
    del tuned, rtn_weights
    out_q, _ = run_block(fn, {**weights, **qweights}, inputs_q, accel, bs, out=out)
    write_back(block, qweights, results)
    return targets, out_q, results, loss_rtn, loss_tuned


def _replay_one(block: nn.Module, captured: CapturedInputs, index: int, x_fp: Tensor, x_q: Tensor,
                qweights: Mapping[str, Tensor], results: Mapping[str, LayerResult], recipe: Recipe,
                accel: Accelerator) -> tuple[Tensor, Tensor]:
    """A block finished in an earlier run: fix its stored weights and recompute its fp and quantized
    outputs exactly as `_tune_one` does, so the next block gets the inputs of the original run."""
    fn, weights, inputs_q, targets = _block_targets(block, captured, index, x_fp, x_q, bool(results), recipe, accel)
    qweights = {k: v.to(device=weights[k].device, dtype=weights[k].dtype) for k, v in qweights.items()}
    out_q, _ = run_block(fn, {**weights, **qweights}, inputs_q, accel, recipe.batch_size,
                         out=x_q if recipe.enable_quanted_input else None)
    write_back(block, qweights, results)
    return targets, out_q


def _block_qweights(block: nn.Module, results: Mapping[str, LayerResult]) -> dict[str, Tensor]:
    """The quantized weights a block holds after write_back, keyed by weight name in the block."""
    _, weights = as_pure(block)
    return {weight_name(key): weights[weight_name(key)] for key in results}


def _rtn_only(block: nn.Module, specs: Mapping[str, QuantSpec], names: Mapping[str, str]) -> dict[str, LayerResult]:
    _, weights = as_pure(block)
    qweights, results = quantize_weights(weights, specs, None, names)
    write_back(block, qweights, results)
    return results


def quantize_model(model: nn.Module, batches: Optional[Iterable[Batch]], spec: QuantSpec, recipe: Recipe, *,
                   layer_config: Optional[Mapping[str, LayerOverride]] = None,
                   block_names: Optional[Iterable[str]] = None, quant_nontext_module: bool = False,
                   device: torch.device | str | Accelerator | None = None, low_gpu_mem_usage: bool = False,
                   progress: bool = True, resume: Optional[ResumeStore] = None,
                   data_parallel: Optional[DataParallel] = None) -> tuple[nn.Module, QuantReport]:
    """Quantize the blocks of `model` in place with SignRound (or RTN when recipe.iters == 0).

    batches: calibration batches (dicts of model inputs or input_ids tensors, all of the same
    seqlen); None is allowed for RTN. block_names: block-list prefixes (default: discovered).
    layer_config: per-layer overrides (see `select_layers`). device: "cuda", "hpu", …, an
    Accelerator, or None (auto). resume: a ResumeStore; blocks it holds are replayed instead of
    tuned, and every newly finished block is added to it. Returns the model (weights fixed to their
    quantized values, each quantized layer carrying `signround_result`) and a QuantReport.
    data_parallel: split every tuning step's batch across ranks (see adapters/distributed.py); the
    recipe is unchanged, and the result equals one process that cuts each step batch into
    gradient_accumulate_steps × world sub-batches.
    """
    start = time.perf_counter()
    accel = device if isinstance(device, Accelerator) else resolve(device, amp=recipe.amp,
                                                                    low_gpu_mem_usage=low_gpu_mem_usage)
    prefixes = list(block_names) if block_names else find_block_lists(model, quant_nontext_module)
    plan = select_layers(model, prefixes, spec, layer_config)
    if batches is None and not recipe.is_rtn:
        raise ValueError("SignRound tuning needs calibration batches; pass batches, or use the 'rtn' recipe")
    batches = None if batches is None else list(batches)
    skipped = dict(plan.skipped)
    layers: dict[str, LayerResult] = {}
    reports: list[BlockReport] = []
    was_training = model.training
    model.eval()
    torch.manual_seed(recipe.seed)
    reset_peak_memory(accel.device)
    total = sum(len(blocks_of(model, p)) for p in prefixes)
    _check_materialized(model)
    moved: Placement = []
    try:
        moved = _move_outside(model, prefixes, accel.device)
        with BlockProgress(total, enabled=progress) as bar:
            for prefix in prefixes:
                blocks = blocks_of(model, prefix)
                captured = None
                if batches is not None:
                    captured = capture_inputs(model, batches, prefix, nsamples=recipe.nsamples,
                                              store_device=accel.store_device, dtype=accel.cache_dtype,
                                              shared_device=accel.device)
                    x_fp = x_q = captured.hidden
                    # The engine owns the activations from here on (they are overwritten block by
                    # block): the captured record keeps no reference to them.
                    captured = attrs.evolve(captured, hidden=captured.hidden.new_empty((0,)))
                for i, block in enumerate(blocks):
                    t0 = time.perf_counter()
                    name = f"{prefix}.{i}"
                    specs, names = _block_specs(plan, name)
                    loss_rtn = loss_tuned = None
                    with _on_device(block, accel.device):
                        if captured is None:
                            results = _rtn_only(block, specs, names)
                        elif captured.calls[i] is None:
                            results = {}
                            for layer in names.values():
                                skipped[layer] = "its block was not called by the model on the calibration data"
                        elif resume is not None and resume.has(name):
                            qweights, results, report = resume.load(name)
                            x_fp, x_q = _replay_one(block, captured, i, x_fp, x_q, qweights, results, recipe, accel)
                        else:
                            # Each block draws its own sample order (the reference's RNG also moves on).
                            block_recipe = attrs.evolve(recipe, seed=recipe.seed + len(reports))
                            if specs:  # low-bit blocks of long runs take the reference's larger lr
                                block_recipe = block_recipe.for_bits(min(s.bits for s in specs.values()))
                            x_fp, x_q, results, loss_rtn, loss_tuned = _tune_one(
                                block, captured, i, x_fp, x_q, specs, names, block_recipe, accel, data_parallel)
                    layers.update({r.name: r for r in results.values()})
                    synchronize(accel.device)
                    if captured is None or captured.calls[i] is None or resume is None or not resume.has(name):
                        report = BlockReport(name=name, layers=tuple(r.name for r in results.values()),
                                             loss_rtn=loss_rtn, loss_tuned=loss_tuned,
                                             seconds=time.perf_counter() - t0,
                                             iters=recipe.iters if captured else 0)
                        main = data_parallel is None or data_parallel.is_main
                        if resume is not None and main and captured is not None and captured.calls[i] is not None:
                            resume.save(name, _block_qweights(block, results), results, report)
                    reports.append(report)
                    bar.done(report)
    finally:
        _restore(moved)
        model.train(was_training)
    mem, kind = peak_memory(accel.device)
    result = QuantReport(spec=spec, recipe=recipe, block_name_to_quantize=tuple(prefixes), blocks=tuple(reports),
                         layers=layers, skipped=skipped, seconds=time.perf_counter() - start,
                         device=str(accel.device), peak_memory_bytes=mem, peak_memory_kind=kind)
    if progress:
        print_summary(result)
    return model, result


def layer_results(model: nn.Module) -> dict[str, LayerResult]:
    """Every LayerResult that `quantize_model` / `write_back` recorded on the modules of `model`."""
    return {r.name: r for m in model.modules() if (r := getattr(m, "signround_result", None)) is not None}


__all__ = ["layer_results", "quantize_model", "quantize_weights", "run_block"]
