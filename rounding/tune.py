"""Tuning one block: the SignRound loop as pure steps over immutable states.

A block is handed in as a pure function `block_fn(weights, batch) -> output` (adapters build it
with torch.func.functional_call). Nothing here knows about nn.Module or Hugging Face.

    prepared = prepare(weights, specs)
    params, opt = init_params(prepared, specs, recipe)
    for t in range(recipe.iters):
        batch, target = select(inputs, targets, indices[t])
        params, opt, loss = step(block_fn, weights, prepared, specs, params, opt, batch, target)
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Optional

import attrs
import torch
from torch import Tensor

from signround.rounding import signsgd
from signround.rounding.grid import GroupedWeight, group_weight, qdq_grouped, qdq_tensors
from signround.rounding.params import RoundingParams
from signround.rounding.recipe import Recipe
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

    def select(self, idx: Tensor, device: torch.device | str | None = None) -> "BlockInputs":
        """The samples at `idx`, moved to `device` (inputs may live on the CPU to save device memory)."""
        def take(t: Tensor) -> Tensor:
            return t.index_select(0, idx.to(t.device)).to(device, non_blocking=True) if device else t.index_select(0, idx.to(t.device))

        def move(x: Any) -> Any:
            if device is not None and isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if device is not None and isinstance(x, tuple):
                return tuple(move(y) for y in x)
            return x

        return BlockInputs(
            hidden=take(self.hidden),
            per_sample={k: take(v) for k, v in self.per_sample.items()},
            shared={k: move(v) for k, v in self.shared.items()},
            loss_mask=None if self.loss_mask is None else take(self.loss_mask),
        )

    def with_hidden(self, hidden: Tensor) -> "BlockInputs":
        return attrs.evolve(self, hidden=hidden)


BlockFn = Callable[[Mapping[str, Tensor], BlockInputs], Tensor]
# Sums a rank's (loss, gradients) over all data-parallel ranks.
ReduceFn = Callable[[Tensor, "dict[str, RoundingParams]"], "tuple[Tensor, dict[str, RoundingParams]]"]
QdqFn = Callable[[GroupedWeight, QuantSpec, RoundingParams], Tensor]


@attrs.frozen
class TuneResult:
    """params: best (or last) RoundingParams per layer; losses: per-iteration training loss (MSE);
    best_loss / first_loss: host floats (first_loss is the RTN starting point)."""

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


def quantized_weights(weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
                      specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams], *,
                      qdq_fn: Optional[QdqFn] = None) -> dict[str, Tensor]:
    """`weights` with every tuned layer replaced by its quantize-dequantize under `params`."""
    out = dict(weights)
    fn = qdq_fn or qdq_grouped
    for k, spec in specs.items():
        out[k] = fn(prepared[k], spec, params[k])
    return out


def init_params(prepared: Mapping[str, GroupedWeight], specs: Mapping[str, QuantSpec], recipe: Recipe,
                ) -> tuple[dict[str, RoundingParams], signsgd.SignSGDState]:
    """RTN starting params for every layer and a fresh SignSGD state for `recipe`."""
    params = {}
    for k, spec in specs.items():
        g = prepared[k]
        params[k] = RoundingParams.zeros((g.grouped.shape[0], g.in_features), spec, device=g.grouped.device)
    config = signsgd.SignSGDConfig(lr=recipe.resolved_lr, minmax_lr=recipe.resolved_minmax_lr,
                                   iters=recipe.iters, tune_minmax=recipe.enable_minmax_tuning)
    return params, signsgd.init(params, config)


def loss_and_grads(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
                   specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams],
                   batch: BlockInputs, target: Tensor, *, qdq_fn: Optional[QdqFn] = None,
                   ) -> tuple[Tensor, dict[str, RoundingParams]]:
    """Loss of the quantized block on `batch` and its gradient w.r.t. every layer's (v, alpha, beta).

    qdq_fn: replaces `qdq_grouped` (a compiled version of it; same values)."""
    leaves = {k: p.map(lambda t: t.detach().requires_grad_(True)) for k, p in params.items()}
    qweights = quantized_weights(weights, prepared, specs, leaves, qdq_fn=qdq_fn)
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
               batches: list[tuple[BlockInputs, Tensor]], *, qdq_fn: Optional[QdqFn] = None,
               total: Optional[int] = None) -> tuple[Tensor, dict[str, RoundingParams]]:
    """Loss and gradients summed over gradient-accumulation sub-batches, each weighted by its share
    of `total` samples (default: the samples in `batches`): the mean over all their elements, the
    reference's accumulation normalisation. With data parallelism `total` is the global batch, so
    summing every rank's result over ranks gives exactly the single-process value."""
    sizes = [b.hidden.shape[0] for b, _ in batches]
    total = total if total is not None else sum(sizes)
    loss_sum: Optional[Tensor] = None
    grad_sum: Optional[dict[str, RoundingParams]] = None
    for (batch, target), n in zip(batches, sizes):
        loss, grads = loss_and_grads(block_fn, weights, prepared, specs, params, batch, target, qdq_fn=qdq_fn)
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


def step(block_fn: BlockFn, weights: Mapping[str, Tensor], prepared: Mapping[str, GroupedWeight],
         specs: Mapping[str, QuantSpec], params: Mapping[str, RoundingParams], state: signsgd.SignSGDState,
         batches: list[tuple[BlockInputs, Tensor]], *, qdq_fn: Optional[QdqFn] = None,
         ) -> tuple[dict[str, RoundingParams], signsgd.SignSGDState, Tensor]:
    """One iteration over `batches` (gradient-accumulation sub-batches): loss, grads, signed step.

    The loss is the mean over all elements of all sub-batches (see `accumulate`). Returns new
    params, new state and the loss.
    """
    loss_sum, grad_sum = accumulate(block_fn, weights, prepared, specs, params, batches, qdq_fn=qdq_fn)
    new_params, new_state = signsgd.update(grad_sum, params, state, loss_sum)
    return new_params, new_state, loss_sum


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


def _split(idx: Tensor, parts: int) -> list[Tensor]:
    return [c for c in torch.chunk(idx, parts) if c.numel()]


def want_compile(device: torch.device | str | None, compile: Optional[bool] = None) -> bool:
    """Whether to torch.compile the tuning step: on by default on CUDA only (never on HPU or the
    CPU, where eager is what the tests pin down); `SIGNROUND_COMPILE=0/1` overrides the default."""
    if compile is not None:
        return bool(compile)
    env = os.environ.get("SIGNROUND_COMPILE")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return device is not None and torch.device(device).type == "cuda"


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """One torch.compile wrapper per function (dynamic shapes after the first recompile, so every
    layer shape of every block shares two graphs at most)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def compiled_qdq() -> QdqFn:
    """A `QdqFn` that runs `qdq_tensors` through torch.compile (fused forward and backward)."""
    fn = _compiled("qdq", qdq_tensors)

    def qdq(gw: GroupedWeight, spec: QuantSpec, params: RoundingParams) -> Tensor:
        return fn(gw.grouped, gw.wmin, gw.wmax, params.v, params.alpha, params.beta, spec, gw.in_features, gw.dtype)

    return qdq


def tune_block(block_fn: BlockFn, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
               inputs: BlockInputs, targets: Tensor, recipe: Recipe, *,
               device: torch.device | str | None = None,
               after_step: Optional[Callable[[], None]] = None, compile: Optional[bool] = None,
               shard: tuple[int, int] = (0, 1), reduce: Optional[ReduceFn] = None) -> TuneResult:
    """Tune the rounding of every weight in `specs` so the quantized block matches `targets`.

    weights: all tensors the block function needs (name → tensor, on the compute device).
    inputs/targets: calibration inputs and full-precision outputs (may live on the CPU; each
    mini-batch is moved to `device`). after_step: called after each optimizer step (HPU mark_step).
    compile: torch.compile the qdq and the optimizer update (None = on CUDA only, see
    `want_compile`); the values are the same as eager, and a compile failure falls back to eager.
    shard/reduce: data parallelism. shard = (rank, world): every rank draws the recipe's global
    step batch (batch_size × gradient_accumulate_steps samples, the same as one process), cuts it
    into gradient_accumulate_steps × world sub-batches and works on its share of them;
    `reduce(loss, grads)` must return their sums over ranks (an all-reduce), so every rank takes
    the same step. The recipe's math is unchanged; the result equals one process cutting each step
    batch the same way (batch_size / world per sub-batch, gradient_accumulate_steps × world of them).
    """
    rank, shards = shard
    if not 0 <= rank < shards:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    recipe.check_ranks(shards)
    prepared = prepare(weights, specs)
    params, state = init_params(prepared, specs, recipe)
    if recipe.iters == 0:
        nan = float("nan")
        return TuneResult(params=params, losses=torch.zeros(0), best_loss=nan, first_loss=nan, iters=0)
    per_step = recipe.batch_size * recipe.gradient_accumulate_steps
    schedule = sample_indices(inputs.num_samples, per_step, recipe.iters, recipe.seed)
    # All indices go to the devices once: no host-to-device copy (and no implicit sync) per step.
    rows_in = torch.stack(schedule).to(inputs.hidden.device)
    rows_tgt = rows_in if targets.device == inputs.hidden.device else torch.stack(schedule).to(targets.device)
    out_device = device or targets.device
    use_compile = want_compile(device or inputs.hidden.device, compile)
    qdq_fn = compiled_qdq() if use_compile else None
    step_fn = _compiled("layer_step", signsgd.layer_step) if use_compile else None
    lrs = signsgd.lr_table(state.config, out_device) if use_compile else None

    def one(t: int, params: dict, state: signsgd.SignSGDState, qdq_fn: Optional[QdqFn], step_fn: Any):
        # The global step batch is cut into `parts` sub-batches; with data parallelism each rank
        # takes its own share of them and `reduce` sums the ranks' weighted losses and gradients.
        parts = recipe.gradient_accumulate_steps * shards
        pairs = list(zip(_split(rows_in[t], parts), _split(rows_tgt[t], parts)))[rank::shards]
        batches = [(inputs.select(a, device), targets.index_select(0, b).to(out_device)) for a, b in pairs]
        loss_sum, grad_sum = accumulate(block_fn, weights, prepared, specs, params, batches, qdq_fn=qdq_fn,
                                        total=int(rows_in[t].numel()))
        if reduce is not None:
            loss_sum, grad_sum = reduce(loss_sum, grad_sum)
        if step_fn is None:
            new_params, new_state = signsgd.update(grad_sum, params, state, loss_sum)
        else:
            new_params, new_state = signsgd.update_with(step_fn, lrs, grad_sum, params, state, loss_sum)
        return new_params, new_state, loss_sum

    losses = []
    for t in range(recipe.iters):
        if t == 0 and use_compile:
            try:
                new = one(t, params, state, qdq_fn, step_fn)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager instead
                warnings.warn(f"torch.compile of the tuning step failed ({type(exc).__name__}: {exc}); "
                              "running eager", RuntimeWarning, stacklevel=2)
                qdq_fn = step_fn = None
                if hasattr(block_fn, "disable_compile"):
                    block_fn.disable_compile()
                new = one(t, params, state, None, None)
        else:
            new = one(t, params, state, qdq_fn, step_fn)
        params, state, loss = new
        losses.append(loss)
        if after_step is not None:
            after_step()
    history = torch.stack(losses).float().cpu()  # one host sync, after the loop
    final = state.best if recipe.use_best else params
    best = float(history.min()) if recipe.use_best else float(history[-1])
    return TuneResult(params=dict(final), losses=history, best_loss=best, first_loss=float(history[0]),
                      iters=recipe.iters)


@torch.no_grad()
def block_loss(block_fn: BlockFn, weights: Mapping[str, Tensor], inputs: BlockInputs, targets: Tensor,
               batch_size: int = 8, device: torch.device | str | None = None) -> float:
    """Mean squared error of `block_fn(weights)` against `targets` over all samples (for reports)."""
    total, count = 0.0, 0
    for start in range(0, inputs.num_samples, batch_size):
        idx = torch.arange(start, min(start + batch_size, inputs.num_samples))
        batch = inputs.select(idx, device)
        tgt = targets.index_select(0, idx.to(targets.device)).to(device or targets.device)
        n = idx.numel()
        total += float(masked_mse(block_fn(weights, batch), tgt, batch.loss_mask)) * n
        count += n
    return total / max(count, 1)
