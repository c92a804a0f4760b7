"""`quantize_model`: capture → for each block: work out its BlockResult, apply it → next block.

    model, report = quantize_model(model, batches, QuantSpec(bits=4, group_size=128), preset("default"))

Per block list (vision lists first when included, then the text decoder): capture the inputs of
every block once (a later list's full-precision inputs X_fp before any block is quantized, its
X_q when its turn comes: from the quantized vision tower); then for each block compute its
full-precision outputs B_fp(X_fp) once (the targets, and the next block's fp inputs), find the
quantized weights of its layers on X_q (the quantized chain, `enable_quanted_input`) or X_fp,
and feed B_q(X_q) to the next block.

The work on a block returns data, a `BlockResult`, made by one function per case: `tuned_block`
(calibration data; RTN with data is tuning with 0 iterations), `rounded_block` (RTN without data),
`not_called_block` (the model never ran the block on the calibration data) and, for a block a
resume store holds, `replayed_block`. One place, `_finish`, applies a result to the model (writes
its weights), stores it for resume, hands the block to a streaming export (`sink`) and its report
to `on_block`. The library prints nothing: front ends pass a progress bar as `on_block` and print
the summary themselves.

Streaming (`stream`, a `BlockSource` such as `hf.streaming.StreamedWeights`): the model's blocks
hold no weights until their turn; block 0 is read before the inputs are captured (capture runs it
once), each later block when the loop reaches it, and each is released after its result is written
out, so the model never needs to fit in RAM. Nothing else changes: a streamed run computes what an
in-RAM run computes, block for block.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Optional, Protocol

import attrs
import torch
from torch import Tensor, nn

from signround.adapters.engine import runtime
from signround.adapters.engine.device import (Accelerator, bound_host_heap, peak_memory,
                                              release_host_memory, reset_peak_memory, resolve, synchronize)
from signround.adapters.engine.distributed import DataParallel
from signround.adapters.engine.report import BlockReport, BlockResult, LayerResult, QuantReport
from signround.adapters.engine.resume import ResumeStore
from signround.adapters.hf.blocks import (LayerOverride, LayerPlan, blocks_of, find_block_lists, is_vision_name,
                                          select_layers)
from signround.adapters.hf.capture import Batch, CapturedInputs, capture_inputs
from signround.adapters.hf.experts import count_routed, experts_modules, not_routed_layers, unfuse_experts
from signround.adapters.hf.placement import check_materialized, move_outside, on_device, restore
from signround.adapters.hf.pure import PureBlock, as_pure, call_block, weight_name, write_back
from signround.adapters.hf.vision import ModalityWeights, modality_positions
from signround.rounding import BlockInputs, QuantizedWeight, QuantSpec, Recipe, masked_mse, quantize_weight

OnBlock = Callable[[BlockReport], None]


class BlockSource(Protocol):
    """Where a streamed model's block weights come from (`hf.streaming.StreamedWeights`)."""

    def load(self, block: nn.Module, name: Optional[str] = None) -> None: ...

    def release(self, block: nn.Module, name: Optional[str] = None) -> None: ...


class BlockSink(Protocol):
    """Takes each finished block (its weights already quantized) as it completes: the streaming
    export (`checkpoint.stream_writer.StreamWriter`)."""

    def write_block(self, name: str, block: nn.Module, result: BlockResult) -> None: ...


@torch.no_grad()
def run_block(fn: PureBlock, weights: Mapping[str, Tensor], inputs: BlockInputs, accel: Accelerator,
              batch_size: int, targets: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
              keep_outputs: bool = True, finite: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[float]]:
    """Outputs of the block on every sample (on the store device, cache dtype) and, when `targets`
    are given, the mean squared error to them over all samples.

    out: write the outputs into this tensor (it may be `inputs.hidden` itself: each mini-batch is
    read before its rows are overwritten), so no second copy of the activations is made.
    keep_outputs=False: only the loss (returns None for the outputs).
    finite: a bool scalar on the compute device, ANDed in place with whether every stored output is
    finite (checked on the device as each mini-batch is made, in the dtype it is stored in; the caller
    reads it once). A host-side pass over a host cache cost 0.25 s a block at 2B dims on the H200 (≈ 1.3 s
    at 70B by size)."""
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
                out = accel.empty_cache((n, *y.shape[1:]), accel.cache_dtype or y.dtype)
            if finite is not None:
                y = y.to(out.dtype)  # a value finite in fp32 may not be in an fp16 cache
                finite &= torch.isfinite(y).all()
            out[start:start + idx.numel()].copy_(y, non_blocking=True)
        del y, batch
        if accel.after_step is not None:
            accel.after_step()
    loss = float(total) / n if (total is not None and n) else None  # one host sync per pass
    return (out if keep_outputs else None), loss


def _block_specs(plan: LayerPlan, block_prefix: str) -> tuple[dict[str, QuantSpec], dict[str, str]]:
    """(weight name inside the block → spec, weight name → full layer name) for one block."""
    specs, names = {}, {}
    for layer, spec in plan.quantize.items():
        if layer.startswith(block_prefix + "."):
            key = weight_name(layer[len(block_prefix) + 1:])
            specs[key], names[key] = spec, layer
    return specs, names


def _as_weights(quantized: Mapping[str, QuantizedWeight], weights: Mapping[str, Tensor],
                names: Mapping[str, str]) -> tuple[dict[str, Tensor], dict[str, LayerResult]]:
    """(weight name → dequantized weight in the original's dtype, full layer name → LayerResult)."""
    qweights, layers = {}, {}
    for key, q in quantized.items():
        qweights[key] = q.dequantize(weights[key].dtype)
        layers[names[key]] = LayerResult(name=names[key], spec=q.spec, scale=q.scale.cpu(), zero=q.zero.cpu())
    return qweights, layers


def _rtn(weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec]) -> dict[str, QuantizedWeight]:
    return {key: quantize_weight(weights[key], spec) for key, spec in specs.items()}


# ------------------------------------------------------------------------------ one function per case


def rounded_block(name: str, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
                  names: Mapping[str, str]) -> BlockResult:
    """No calibration data: every layer rounded to nearest."""
    qweights, layers = _as_weights(_rtn(weights, specs), weights, names)
    report = BlockReport(name=name, layers=tuple(layers), loss_rtn=None, loss_tuned=None, seconds=0.0,
                         source="rounded")
    return BlockResult(name=name, weights=qweights, layers=layers, report=report)


def not_called_block(name: str, names: Mapping[str, str]) -> BlockResult:
    """The model never called this block on the calibration data: its layers stay in full precision."""
    why = "its block was not called by the model on the calibration data"
    report = BlockReport(name=name, layers=(), loss_rtn=None, loss_tuned=None, seconds=0.0, source="not_called")
    return BlockResult(name=name, weights={}, layers={}, report=report, skipped={n: why for n in names.values()})


def replayed_block(stored: BlockResult) -> BlockResult:
    """A block a resume store holds: its stored weights, marked as replayed."""
    return attrs.evolve(stored, report=attrs.evolve(stored.report, source="replayed"))


def tuned_block(name: str, fn: PureBlock, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
                names: Mapping[str, str], inputs: BlockInputs, targets: Tensor, recipe: Recipe,
                accel: Accelerator, data_parallel: Optional[DataParallel] = None,
                run_policy: Optional[runtime.Runtime] = None) -> BlockResult:
    """Tune the rounding of the block's layers so B_q(inputs) matches `targets`.

    Both candidates are scored on all samples: RTN and the iterate tuning chose. With
    `recipe.use_best`, a tuned iterate worse than RTN there (it was chosen on mini-batch losses)
    is dropped and the block keeps RTN; the report says so (`kept_rtn`)."""
    bs = recipe.batch_size
    if not specs:
        _, loss = run_block(fn, weights, inputs, accel, bs, targets, keep_outputs=False)
        report = BlockReport(name=name, layers=(), loss_rtn=loss, loss_tuned=loss, seconds=0.0, iters=recipe.iters)
        return BlockResult(name=name, weights={}, layers={}, report=report)
    # RTN is deterministic: its weights are built again in the rare case they are kept, rather than
    # held (int32 codes: 4 bytes a weight) on the device through the whole tuning run.
    clock = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:  # read after a pass that ended in a host sync
        nonlocal clock
        now = time.perf_counter()
        phases[name], clock = now - clock, now

    rtn_weights, _ = _as_weights(_rtn(weights, specs), weights, names)
    _, loss_rtn = run_block(fn, {**weights, **rtn_weights}, inputs, accel, bs, targets, keep_outputs=False)
    del rtn_weights
    lap("score_rtn")
    tuned = runtime.tune(fn, weights, specs, inputs, targets, recipe, accel, data_parallel, run_policy)
    bad = (~torch.isfinite(tuned.losses)).nonzero()
    if bad.numel():
        raise FloatingPointError(f"block {name}: the tuning loss became NaN/Inf at iteration "
                                 f"{int(bad[0])} (layers {sorted(names.values())[:3]}…); try recipe 'rtn' for this "
                                 "model, a smaller lr, or float32 activations (amp=False)")
    qweights, layers = _as_weights(tuned.quantized, weights, names)
    del tuned  # its last params (fp32 v) and int32 codes are not needed for the passes below
    lap("tune")
    _, loss_tuned = run_block(fn, {**weights, **qweights}, inputs, accel, bs, targets, keep_outputs=False)
    lap("score_tuned")
    assert loss_rtn is not None and loss_tuned is not None
    kept_rtn = recipe.use_best and loss_tuned > loss_rtn
    if kept_rtn:
        qweights, layers = _as_weights(_rtn(weights, specs), weights, names)
    report = BlockReport(name=name, layers=tuple(layers), loss_rtn=loss_rtn, loss_tuned=loss_tuned, seconds=0.0,
                         iters=recipe.iters, kept_rtn=kept_rtn, phases=phases)
    return BlockResult(name=name, weights=qweights, layers=layers, report=report)


# ------------------------------------------------------------------------------ the loop


def _fp_targets(fn: PureBlock, weights: Mapping[str, Tensor], inputs_fp: BlockInputs, x_fp: Tensor,
                name: str, recipe: Recipe, accel: Accelerator, inplace: bool) -> Tensor:
    """B_fp(X_fp) on every sample (written over X_fp's buffer when the chains are separate)."""
    finite = torch.ones((), dtype=torch.bool, device=accel.device)
    targets, _ = run_block(fn, weights, inputs_fp, accel, recipe.batch_size, out=x_fp if inplace else None,
                           finite=finite)
    assert targets is not None
    if not bool(finite):  # checked on the device per mini-batch, not over the host cache afterwards
        raise FloatingPointError(f"block {name} produces NaN/Inf activations in full precision "
                                 "on the calibration data; check the model's weights, or load it in bfloat16/float32 "
                                 "instead of float16 (overflow)")
    return targets


def _finish(block: nn.Module, result: BlockResult, started: float, accel: Accelerator,
            store: Optional[ResumeStore], on_block: Optional[OnBlock], sink: Optional[BlockSink] = None) -> BlockResult:
    """The one place a BlockResult touches the world: its weights go into the block, a newly tuned
    block goes into the resume store, the block to the streaming export, its report (with this
    run's wall time) to `on_block`. Returns the result without its weights (the block holds them):
    the run keeps every block's grids and report, never a second copy of its weights."""
    write_back(block, result.weights)
    synchronize(accel.device)
    result = attrs.evolve(result, report=attrs.evolve(result.report, seconds=time.perf_counter() - started))
    if store is not None and result.report.source == "tuned":
        store.save(result)
    if sink is not None:
        sink.write_block(result.name, block, result)
    # The block's passes freed their host temporaries; glibc keeps freed chunks below its (self-raising)
    # mmap threshold for reuse, so without a trim an in-RAM run grew by more than a block per block
    # (spec/performance.md, issue 16). It costs nothing measurable.
    release_host_memory()
    if on_block is not None:
        on_block(result.report)
    return attrs.evolve(result, weights={})


def quantize_model(model: nn.Module, batches: Optional[Iterable[Batch]], spec: QuantSpec, recipe: Recipe, *,
                   layer_config: Optional[Mapping[str, LayerOverride]] = None,
                   block_names: Optional[Iterable[str]] = None, quant_nontext_module: bool = False,
                   device: torch.device | str | Accelerator | None = None, low_gpu_mem_usage: bool = False,
                   cache: str = "auto",
                   on_block: Optional[OnBlock] = None, resume: Optional[ResumeStore] = None,
                   data_parallel: Optional[DataParallel] = None, stream: Optional[BlockSource] = None,
                   sink: Optional[BlockSink] = None,
                   loss_weighting: Optional[ModalityWeights] = None) -> tuple[nn.Module, QuantReport]:
    """Quantize the blocks of `model` in place with SignRound (or RTN when recipe.iters == 0).

    batches: calibration batches (dicts of model inputs or input_ids tensors, all of the same
    seqlen); None is allowed for RTN. block_names: block-list prefixes (default: discovered).
    layer_config: per-layer overrides (see `select_layers`). device: "cuda", "hpu", …, an
    Accelerator, or None (auto). on_block: called with each block's BlockReport as it finishes
    (a progress bar). resume: a ResumeStore; blocks it holds are replayed instead of tuned, and
    every newly tuned block is added to it. data_parallel: split every tuning step's batch across
    ranks (see engine/distributed.py); the recipe is unchanged, and the result equals one process
    that cuts each step batch into gradient_accumulate_steps × world sub-batches. stream: the
    blocks' weights are read from it one block at a time (the model's blocks are on the meta device
    until then) and released after. sink: each finished block is handed to it (a streaming export).
    loss_weighting: weight image and text token positions in the text decoder's block loss
    (`hf.vision.ModalityWeights`; the vision blocks' loss is unchanged).

    Returns the model (weights fixed to their quantized values) and a QuantReport, whose `layers`
    hold every quantized layer's grid for export. Nothing is written onto the modules besides their
    weights, the global RNG is left alone (the sampler is seeded by the recipe) and nothing is printed.
    """
    start = time.perf_counter()
    accel = device if isinstance(device, Accelerator) else resolve(device, amp=recipe.amp,
                                                                    low_gpu_mem_usage=low_gpu_mem_usage, cache=cache)
    prefixes = list(block_names) if block_names else find_block_lists(model, quant_nontext_module)
    unfuse_experts(model, prefixes)  # fused MoE experts become one Linear per matrix (hf/experts.py)
    plan = select_layers(model, prefixes, spec, layer_config)
    if batches is None and not recipe.is_rtn:
        raise ValueError("SignRound tuning needs calibration batches; pass batches, or use the 'rtn' recipe")
    batches = None if batches is None else list(batches)
    store = resume if data_parallel is None or data_parallel.is_main else None  # every rank holds the same result
    run_policy = runtime.policy(accel)
    results: list[BlockResult] = []
    was_training = model.training
    model.eval()
    reset_peak_memory(accel.device)
    check_materialized(model, streamed=prefixes if stream is not None else ())
    if stream is not None and len(prefixes) > 1:
        raise ValueError(f"streaming from disk quantizes one block list per run, got {prefixes}; with vision blocks "
                         "(quant_nontext_module) load the model in RAM")
    if stream is not None:
        bound_host_heap()
    moved = []
    try:
        moved = move_outside(model, prefixes, accel.device)
        capture = dict(nsamples=recipe.nsamples, store_device=accel.store_device, dtype=accel.cache_dtype,
                       shared_device=accel.device, alloc=accel.empty_cache)
        # With vision lists first, a later list's full-precision inputs (the targets' chain) are
        # captured before any block changes; its quantized inputs after the earlier lists are
        # quantized (the quantized-input chain carries across towers).
        fp_hidden = {p: capture_inputs(model, batches, p, **capture).hidden for p in prefixes[1:]} \
            if batches is not None and recipe.enable_quanted_input and stream is None else {}
        for prefix in prefixes:
            blocks = blocks_of(model, prefix)
            captured: Optional[CapturedInputs] = None
            if stream is not None and blocks:
                stream.load(blocks[0], f"{prefix}.0")  # capture runs block 0 once
            if batches is not None:
                positions = None if loss_weighting is None or is_vision_name(prefix) else \
                    modality_positions(model, loss_weighting)  # the text decoder's loss only
                captured = capture_inputs(model, batches, prefix, **capture, position_weights=positions)
                x_fp = x_q = captured.hidden
                if prefix in fp_hidden:
                    x_fp = fp_hidden.pop(prefix)
                # The engine owns the activations from here on (they are overwritten block by
                # block): the captured record keeps no reference to them.
                captured = attrs.evolve(captured, hidden=captured.hidden.new_empty((0,)))
            for i, block in enumerate(blocks):
                started = time.perf_counter()
                name = f"{prefix}.{i}"
                specs, names = _block_specs(plan, name)
                call = None if captured is None else captured.calls[i]
                if stream is not None and i > 0:
                    stream.load(block, name)
                with on_device(block, accel.device):
                    if captured is None:
                        _, weights = as_pure(block)
                        result = rounded_block(name, weights, specs, names)
                    elif call is None:
                        result = not_called_block(name, names)
                    else:
                        fn, weights = as_pure(block, call.layout, autocast_dtype=accel.autocast_dtype,
                                              call=runtime.block_call_for(run_policy, block, specs)
                                              if specs and recipe.iters > 0 else call_block)
                        inputs_fp = captured.block_inputs(i, x_fp)
                        inputs_q = captured.block_inputs(i, x_q) if recipe.enable_quanted_input else inputs_fp
                        inplace = recipe.enable_quanted_input and x_fp is not x_q
                        setup_done = time.perf_counter()  # host work only so far (the moves are queued)
                        targets = _fp_targets(fn, weights, inputs_fp, x_fp, name, recipe, accel, inplace)
                        targets_s = time.perf_counter() - setup_done  # its finite check synced the host
                        if resume is not None and resume.has(name):
                            result = replayed_block(resume.load(name))
                        else:
                            # Each block draws its own sample order (the reference's RNG also moves on).
                            block_recipe = attrs.evolve(recipe, seed=recipe.seed + len(results))
                            if specs:  # low-bit blocks of long runs take the reference's larger lr
                                block_recipe = block_recipe.for_bits(min(s.bits for s in specs.values()))
                            with count_routed(block, name) as routed:
                                result = tuned_block(name, fn, weights, specs, names, inputs_q, targets,
                                                     block_recipe, accel, data_parallel,
                                                     runtime.for_block_list(run_policy, prefix))
                            # experts no token reached while tuning got no gradient: they kept their RTN rounding
                            not_routed = not_routed_layers(routed, {f"{name}.{n}": m for n, m in
                                                                    experts_modules(block).items()})
                            if not_routed:
                                result = attrs.evolve(result, report=attrs.evolve(result.report, not_routed=not_routed))
                        qweights = {k: v.to(device=weights[k].device, dtype=weights[k].dtype)
                                    for k, v in result.weights.items()}
                        before_outputs = time.perf_counter()
                        x_q, _ = run_block(fn, {**weights, **qweights}, inputs_q, accel, recipe.batch_size,
                                           out=x_q if recipe.enable_quanted_input else None)
                        synchronize(accel.device)
                        result = attrs.evolve(result, report=attrs.evolve(result.report, phases={
                            "setup": setup_done - started, "targets": targets_s, **result.report.phases,
                            "outputs": time.perf_counter() - before_outputs}))
                        x_fp = targets
                        del qweights, weights, fn
                results.append(_finish(block, result, started, accel, store, on_block, sink))
                if stream is not None:
                    stream.release(block, name)
                    release_host_memory()
    finally:
        restore(moved)
        model.train(was_training)
    mem, kind = peak_memory(accel.device)
    layers = {n: r for res in results for n, r in res.layers.items()}
    skipped = {**plan.skipped, **{n: why for res in results for n, why in res.skipped.items()}}
    report = QuantReport(spec=spec, recipe=recipe, block_name_to_quantize=tuple(prefixes),
                         blocks=tuple(r.report for r in results), layers=layers, skipped=skipped,
                         seconds=time.perf_counter() - start, device=str(accel.device), peak_memory_bytes=mem,
                         peak_memory_kind=kind)
    return model, report


__all__ = ["BlockSink", "BlockSource", "OnBlock", "not_called_block", "quantize_model", "replayed_block", "rounded_block", "run_block",
           "tuned_block"]
