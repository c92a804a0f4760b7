"""Tuning one block: the SignRound loop as pure steps over immutable states.

A block is handed in as a pure function `block_fn(weights, batch) -> output` (adapters build it
with torch.func.functional_call). Nothing here knows about nn.Module, devices or Hugging Face: the
caller hands in each step's batches (already where they must be), and may hand in compiled qdq
halves and a cross-rank reduce. The loop `tune_block` runs is five lines of public steps:

    prepared = prepare(weights, specs)
    state = init(prepared, specs, recipe)                  # params, optimizer state, best iterate
    for parts in step_batches(inputs, targets, recipe):    # the seeded epoch sampler
        state, loss = step(block_fn, weights, prepared, specs, state, parts)
    quantized = result(state, prepared, specs, recipe)     # QuantizedWeight per layer

Donation: `step(..., donate=True)` writes the new params and best iterate into the buffers of the
state it is handed (the caller must not use that state again); without it no input is modified.
Both give the same values (`spec/rounding.md`, "Steps and donation").
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import attrs
import torch
from torch import Tensor

from signround.rounding import best as best_iterate
from signround.rounding.grid import GroupedWeight, QuantizedWeight, group_weight
from signround.rounding.params import RoundingParams
from signround.rounding.recipe import Recipe
from signround.rounding.recompute import QdqOps, recomputing_qdq
from signround.rounding.signsgd import SignSGD, SignSGDState, sign_sgd
from signround.rounding.spec import QuantSpec

# The reference scales the loss by 1000 before backward; a sign step ignores the scale, but with
# fp16 autocast it keeps small gradients out of the subnormal range.
LOSS_SCALE = 1000.0


@attrs.frozen
class BlockInputs:
    """Calibration inputs of a block.

    hidden: [N, ...] the block's first positional input, one row per sample.
    per_sample: keyword inputs whose dim 0 indexes samples (attention masks, mrope position ids…).
    shared: keyword inputs identical for every sample (rotary tables, flags), passed as they are.
    loss_mask: optional [N, L] (1 = position counts in the loss; padding is 0).
    """

    hidden: Tensor
    per_sample: Mapping[str, Tensor] = attrs.field(factory=dict)
    shared: Mapping[str, Any] = attrs.field(factory=dict)
    loss_mask: Optional[Tensor] = None

    @property
    def num_samples(self) -> int:
        return self.hidden.shape[0]

    def select(self, idx: Tensor) -> "BlockInputs":
        """The samples at `idx` (an index tensor on the inputs' device); shared inputs as they are."""
        return BlockInputs(hidden=self.hidden.index_select(0, idx),
                           per_sample={k: v.index_select(0, idx) for k, v in self.per_sample.items()},
                           shared=dict(self.shared),
                           loss_mask=None if self.loss_mask is None else self.loss_mask.index_select(0, idx))

    def with_hidden(self, hidden: Tensor) -> "BlockInputs":
        return attrs.evolve(self, hidden=hidden)


BlockFn = Callable[[Mapping[str, Tensor], BlockInputs], Tensor]
# One step's work: its gradient-accumulation sub-batches (inputs, targets) and the number of samples
# the step's loss is the mean over (with data parallelism: the global step batch of all ranks).
StepParts = tuple[Sequence[tuple[BlockInputs, Tensor]], int]
# Sums a rank's (loss, gradients) over all data-parallel ranks.
ReduceFn = Callable[[Tensor, "dict[str, RoundingParams]"], "tuple[Tensor, dict[str, RoundingParams]]"]


@attrs.frozen
class TuneState:
    """Everything one block's tuning carries from step to step: params, optimizer state, best iterate."""

    params: Mapping[str, RoundingParams]
    opt: SignSGDState
    best: best_iterate.BestState
    optimizer: SignSGD


@attrs.frozen
class TuneResult:
    """quantized: the chosen iterate of every layer (best, or last with use_best=False) as codes,
    fp16 scales and zeros; params: the params after the last step; losses: per-iteration training
    loss (MSE); best_loss / first_loss: host floats (first_loss is the RTN starting point)."""

    quantized: Mapping[str, QuantizedWeight]
    params: Mapping[str, RoundingParams]
    losses: Tensor
    best_loss: float
    first_loss: float
    iters: int


def masked_mse(output: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error in float32; with `mask` [N, L], padded positions do not count."""
    diff = (output.float() - target.float()).pow(2)
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim())))
    denom = (m.sum() * diff[0, 0].numel()).clamp(min=1.0)
    return (diff * m).sum() / denom


def prepare(weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec]) -> dict[str, GroupedWeight]:
    """Group every weight named in `specs` once (range statistics are fixed during tuning)."""
    missing = sorted(set(specs) - set(weights))
    if missing:
        raise KeyError(f"specs name weights the block does not have: {missing}")
    return {k: group_weight(weights[k], spec) for k, spec in specs.items()}


def optimizer_for(recipe: Recipe) -> SignSGD:
    return sign_sgd(recipe.resolved_lr, recipe.resolved_minmax_lr, iters=recipe.iters,
                    tune_minmax=recipe.enable_minmax_tuning)


def init(prepared: Mapping[str, GroupedWeight], specs: Mapping[str, QuantSpec], recipe: Recipe,
         optimizer: Optional[SignSGD] = None) -> TuneState:
    """RTN starting params for every layer, a fresh optimizer state, RTN as the first best candidate."""
    params = {k: RoundingParams.zeros((g.grouped.shape[0], g.in_features), specs[k], device=g.grouped.device)
              for k, g in prepared.items()}
    opt = optimizer or optimizer_for(recipe)
    return TuneState(params=params, opt=opt.init(params), best=best_iterate.init(prepared, specs, params),
                     optimizer=opt)


def _clone(state: TuneState) -> TuneState:
    return attrs.evolve(state, params={k: p.map(torch.clone) for k, p in state.params.items()},
                        opt=attrs.evolve(state.opt, step=state.opt.step.clone()), best=best_iterate.clone(state.best))


def quantized_weights(weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
                      specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams], *,
                      ops: QdqOps = QdqOps(), trigger: Optional[Tensor] = None,
                      sinks: Optional[Mapping[str, Any]] = None) -> dict[str, Tensor]:
    """`weights` with every tuned layer replaced by its quantize-dequantize under `params`."""
    out = dict(weights)
    for k, spec in specs.items():
        out[k] = recomputing_qdq(prepared[k], spec, params[k], ops=ops, trigger=trigger,
                                 sink=None if sinks is None else sinks[k])
    return out


def loss_and_grads(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
                   specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams],
                   batch: BlockInputs, target: Tensor, *, ops: QdqOps = QdqOps(),
                   ) -> tuple[Tensor, dict[str, RoundingParams]]:
    """Loss of the quantized block on `batch` and its gradient w.r.t. every layer's (v, alpha, beta)."""
    leaves = {k: p.map(lambda t: t.detach().requires_grad_(True)) for k, p in params.items()}
    qweights = quantized_weights(weights, prepared, specs, leaves, ops=ops)
    loss = masked_mse(block_fn(qweights, batch), target, batch.loss_mask)
    flat = [t for k in leaves for t in leaves[k].tensors()]
    grads = torch.autograd.grad(loss * LOSS_SCALE, flat, allow_unused=True)
    out, i = {}, 0
    for k in leaves:
        g = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves[k].tensors(), grads[i:i + 3])]
        out[k] = RoundingParams(*g)
        i += 3
    return loss.detach(), out


def accumulate(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
               specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams],
               parts: Sequence[tuple[BlockInputs, Tensor]], *, ops: QdqOps = QdqOps(),
               total: Optional[int] = None) -> tuple[Tensor, dict[str, RoundingParams]]:
    """Loss and gradients summed over gradient-accumulation sub-batches, each weighted by its share
    of `total` samples (default: the samples in `parts`): the mean over all their elements, the
    reference's accumulation normalisation. With data parallelism `total` is the global batch, so
    summing every rank's result over ranks gives exactly the single-process value."""
    sizes = [b.hidden.shape[0] for b, _ in parts]
    total = total if total is not None else sum(sizes)
    loss_sum: Optional[Tensor] = None
    grad_sum: Optional[dict[str, RoundingParams]] = None
    for (batch, target), n in zip(parts, sizes):
        loss, grads = loss_and_grads(block_fn, weights, prepared, specs, params, batch, target, ops=ops)
        if n != total:  # a weight of 1 would be a wasted pass over every gradient
            w = n / float(total)
            loss, grads = loss * w, {k: g.map(lambda t: t * w) for k, g in grads.items()}
        if grad_sum is None:
            loss_sum, grad_sum = loss, grads
        else:
            loss_sum = loss_sum + loss
            grad_sum = {k: RoundingParams(*(a + b for a, b in zip(grad_sum[k].tensors(), grads[k].tensors())))
                        for k in grads}
    assert loss_sum is not None and grad_sum is not None
    return loss_sum, grad_sum


def _fused(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
           specs: Mapping[str, QuantSpec], state: TuneState, batch: BlockInputs, target: Tensor,
           ops: QdqOps) -> Tensor:
    """One step on one batch, updating `state`'s buffers in place: each layer's backward recomputes
    its qdq, records its codes as the best when this loss is the lowest, and takes its signed step at
    once, so no layer's gradient outlives its own backward. Same values as accumulate + update."""
    if not specs:  # nothing to tune: the loss alone
        with torch.no_grad():
            return masked_mse(block_fn(weights, batch), target, batch.loss_mask)
    cell: dict[str, Tensor] = {}
    opt, best = state.optimizer, state.best
    lr, mlr = opt.rates(state.opt) if ops.step is not None else (None, None)  # once a step, not per layer

    def sink_for(k: str):
        g, p, spec = prepared[k], state.params[k], specs[k]

        def sink(grad: Tensor) -> None:
            if ops.step is not None:  # one function (compiled by the engine): `layer_step.py`
                ops.step(g.grouped, g.wmin, g.wmax, p.v, p.alpha, p.beta, spec, g.in_features, g.dtype, grad,
                         cell["better"], best.codes[k], best.alpha[k], best.beta[k], lr, mlr, opt.tune_minmax)
                return
            codes, gv, ga, gb = ops.vjp(g.grouped, g.wmin, g.wmax, p.v, p.alpha, p.beta, spec, g.in_features,
                                        g.dtype, grad)
            best_iterate.select(best, k, cell["better"], codes, p, donate=True)
            opt.update_layer(RoundingParams(gv, ga, gb), state.opt, p, donate=True)
        return sink

    trigger = torch.empty(0, device=target.device, requires_grad=True)
    qweights = quantized_weights(weights, prepared, specs, state.params, ops=ops, trigger=trigger,
                                 sinks={k: sink_for(k) for k in specs})
    loss = masked_mse(block_fn(qweights, batch), target, batch.loss_mask)
    cell["better"] = best_iterate.is_better(best, loss)
    # A layer the block did not use on this batch has a zero gradient: sign 0, no move; its codes are
    # those of the params it keeps, so its best entry needs no update either.
    torch.autograd.backward(loss * LOSS_SCALE, inputs=[trigger])
    best.loss.copy_(torch.where(cell["better"], loss.detach(), best.loss))
    return loss.detach()


def step(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
         specs: Mapping[str, QuantSpec], state: TuneState, parts: StepParts | Sequence[tuple[BlockInputs, Tensor]],
         *, ops: QdqOps = QdqOps(), reduce: Optional[ReduceFn] = None, donate: bool = False,
         ) -> tuple[TuneState, Tensor]:
    """One iteration: loss and gradients over the step's sub-batches (see `accumulate`), summed over
    ranks by `reduce`, the best iterate updated with the params that gave the loss, a signed step.

    parts: the sub-batches, or (sub-batches, total samples) as `step_batches` yields them. Returns
    the new state and the loss (a device scalar)."""
    if parts and isinstance(parts, tuple) and len(parts) == 2 and isinstance(parts[1], int):
        subs, total = parts
    else:
        subs, total = parts, None
    if not donate:
        state = _clone(state)
    if len(subs) == 1 and reduce is None and (total is None or total == subs[0][0].num_samples):
        batch, target = subs[0]
        loss = _fused(block_fn, weights, prepared, specs, state, batch, target, ops)
        return attrs.evolve(state, opt=state.optimizer.advance(state.opt, donate=donate)), loss
    loss, grads = accumulate(block_fn, weights, prepared, specs, state.params, subs, ops=ops, total=total)
    if reduce is not None:
        loss, grads = reduce(loss, grads)
    better = best_iterate.is_better(state.best, loss)
    best = state.best
    for k in state.params:
        best = best_iterate.select(best, k, better, best_iterate.codes_of(prepared[k], specs[k], state.params[k]),
                                   state.params[k], donate=True)
    best = best_iterate.with_loss(best, better, loss)
    params, opt = state.optimizer.update(grads, state.opt, state.params, donate=True)
    return attrs.evolve(state, params=params, opt=opt, best=best), loss


def sample_indices(num_samples: int, per_step: int, iters: int, seed: int) -> list[Tensor]:
    """Seeded sample indices for every iteration, drawn in epochs (the reference's IndexSampler):
    a seeded permutation of all samples is cut into consecutive subsets of `per_step`; when fewer
    than `per_step` remain, a fresh permutation starts. Every sample is used equally often."""
    gen = torch.Generator().manual_seed(seed)
    k = min(per_step, num_samples)
    out: list[Tensor] = []
    perm, pos = torch.randperm(num_samples, generator=gen), 0
    for _ in range(iters):
        if pos + k > num_samples:
            perm, pos = torch.randperm(num_samples, generator=gen), 0
        out.append(perm[pos:pos + k])
        pos += k
    return out


def split_step(idx: Tensor, parts: int) -> list[Tensor]:
    """One step's sample indices cut into `parts` consecutive sub-batches (none empty)."""
    return [c for c in torch.chunk(idx, parts) if c.numel()]


def step_batches(inputs: BlockInputs, targets: Tensor, recipe: Recipe) -> Iterator[StepParts]:
    """The recipe's steps over `inputs`/`targets` as they lie: every iteration's sub-batches
    (gradient_accumulate_steps of them) and its sample count."""
    per_step = recipe.batch_size * recipe.gradient_accumulate_steps
    for rows in sample_indices(inputs.num_samples, per_step, recipe.iters, recipe.seed):
        subs = split_step(rows, recipe.gradient_accumulate_steps)
        yield [(inputs.select(r.to(inputs.hidden.device)), targets.index_select(0, r.to(targets.device)))
               for r in subs], int(rows.numel())


def result(state: TuneState, prepared: Mapping[str, GroupedWeight], specs: Mapping[str, QuantSpec],
           recipe: Recipe) -> dict[str, QuantizedWeight]:
    """The chosen iterate per layer: the best one, or the last with `use_best=False`."""
    if recipe.use_best:
        return best_iterate.to_quantized(state.best, prepared, specs)
    with torch.no_grad():
        return {k: best_iterate.quantized_of(prepared[k], specs[k],
                                             best_iterate.codes_of(prepared[k], specs[k], state.params[k]),
                                             state.params[k].alpha, state.params[k].beta) for k in specs}


def tune_block(block_fn: BlockFn, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
               inputs: BlockInputs, targets: Tensor, recipe: Recipe, *,
               batches: Optional[Iterable[StepParts]] = None, ops: QdqOps = QdqOps(),
               reduce: Optional[ReduceFn] = None, optimizer: Optional[SignSGD] = None) -> TuneResult:
    """Tune the rounding of every weight in `specs` so the quantized block matches `targets`.

    weights: all tensors the block function needs (name → tensor). inputs/targets: calibration
    inputs and full-precision outputs. Runtime, all optional: batches — the steps' sub-batches
    (default `step_batches(inputs, targets, recipe)`, on the inputs' device; the engine passes its
    own, moved to the compute device and split across data-parallel ranks); ops — the qdq halves
    (compiled ones from the engine on CUDA); reduce — sums loss and gradients over ranks;
    optimizer — default `sign_sgd` of the recipe. The state is donated from step to step (nothing
    the caller passed in is modified).
    """
    prepared = prepare(weights, specs)
    state = init(prepared, specs, recipe, optimizer)
    losses: list[Tensor] = []
    if recipe.iters > 0:
        for parts in (batches if batches is not None else step_batches(inputs, targets, recipe)):
            state, loss = step(block_fn, weights, prepared, specs, state, parts, ops=ops, reduce=reduce, donate=True)
            losses.append(loss)
    return finish(state, prepared, specs, recipe, losses)


def finish(state: TuneState, prepared: Mapping[str, GroupedWeight], specs: Mapping[str, QuantSpec], recipe: Recipe,
           losses: Sequence[Tensor]) -> TuneResult:
    """The TuneResult of a finished loop: the chosen iterate and the per-step losses (device
    scalars, read with one host sync here, after the loop; a recipe with iters > 0 must have run
    at least one step)."""
    if recipe.iters == 0:
        nan = float("nan")
        return TuneResult(quantized=result(state, prepared, specs, recipe), params=state.params,
                          losses=torch.zeros(0), best_loss=nan, first_loss=nan, iters=0)
    history = torch.stack(list(losses)).float().cpu()
    best = float(history.min()) if recipe.use_best else float(history[-1])
    return TuneResult(quantized=result(state, prepared, specs, recipe), params=dict(state.params), losses=history,
                      best_loss=best, first_loss=float(history[0]), iters=len(losses))


@torch.no_grad()
def block_loss(block_fn: BlockFn, weights: Mapping[str, Tensor], inputs: BlockInputs, targets: Tensor,
               batch_size: int = 8) -> float:
    """Mean squared error of `block_fn(weights)` against `targets` over all samples (for reports)."""
    total, count = 0.0, 0
    for start in range(0, inputs.num_samples, batch_size):
        idx = torch.arange(start, min(start + batch_size, inputs.num_samples), device=inputs.hidden.device)
        batch = inputs.select(idx)
        tgt = targets.index_select(0, idx.to(targets.device))
        n = idx.numel()
        total += float(masked_mse(block_fn(weights, batch), tgt, batch.loss_mask)) * n
        count += n
    return total / max(count, 1)


__all__ = ["BlockFn", "BlockInputs", "LOSS_SCALE", "ReduceFn", "StepParts", "TuneResult", "TuneState", "accumulate",
           "block_loss", "finish", "init", "loss_and_grads", "masked_mse", "optimizer_for", "prepare",
           "quantized_weights", "result", "sample_indices", "split_step", "step", "step_batches", "tune_block"]
