"""Runtime policy for block tuning, decided here and nowhere else.

The core (`signround.rounding`) computes the method and takes its runtime as arguments; this
module chooses them for a device:
- compile: the qdq halves go through torch.compile on CUDA by default (`SIGNROUND_COMPILE` forces
  it on or off), with inductor told to honour every precision cast (the fp16 rounding of scales is
  part of the grid). Before first use, the compiled halves are checked once per process against
  eager on a small layer; a compiler failure falls back to eager with one warning.
- layer step: with compile on, each layer's whole in-backward step (qdq vjp, best-iterate select,
  signed step; `rounding/layer_step.py`) is one compiled function, so the fp32 gradient of v is
  never written out and v and the best codes are read and written once a step (values equal to
  the unfused ops bit for bit on the CPU's inductor; checked on CUDA by `tests/bench/step_floor.py`).
- batches: each step's samples are drawn by the core's epoch sampler, cut into sub-batches, split
  across data-parallel ranks, and moved to the compute device here; on Gaudi, `mark_step()` runs at
  every step boundary (when the next step's batch is asked for).
- donation: the tuning state is always donated from step to step (the core's in-place path).
- block compile: the block forward goes through torch.compile (one graph shared by the blocks of
  a list) on CUDA by default for blocks of more than `GRAPHS_MAX_WEIGHTS` tuned weights, where the
  GPU is the limit and fused norms/SiLU/rope pay (H200: 2b dims 3.19 -> 2.60 s per block and peak
  4.23 -> 3.76 GiB; 8b 10.94 -> 9.77 s, 11.05 -> 10.49 GiB; block losses within 0.1 % of eager, the
  fused kernels reassociate); `SIGNROUND_COMPILE_BLOCK=0/1` forces it. Smaller blocks get graphs.
- CUDA graphs: each block's steps after a short warm-up are replayed from one captured graph
  (`graphs.py`), which removes the host's launch cost per step. On by default for blocks of at most
  `GRAPHS_MAX_WEIGHTS` tuned weights, where the host is the limit (H200, default recipe: 7.2x per
  block at SmolLM2-135M's 10 M, 1.02x at Qwen2-VL-2B's 47 M, for +23 % / +3 % peak memory, the
  graph's own pool); `SIGNROUND_CUDA_GRAPHS=0/1` forces it off or on. The values are the eager
  step's bit for bit (measured at both sizes). Over the compiled block forward (2b dims, forced) graphs
  bought 2 % for +3 % memory (2.53 -> 2.47 s, H200 2026-12-02d): not combined by default.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional

import attrs
import torch
from torch import Tensor

from signround.adapters.engine import env as environment
from signround.adapters.engine import graphs
from signround.adapters.engine.device import Accelerator
from signround.adapters.engine.distributed import DataParallel
from signround.adapters.hf.blocks import is_vision_name
from signround.adapters.hf.pure import call_block
from signround.rounding import (BlockInputs, QdqOps, QuantSpec, Recipe, StepParts, TuneResult, group_weight,
                                qdq_forward, qdq_vjp, sample_indices, split_step, tune_block)
from signround.rounding.grid import qdq_tensors
from signround.rounding.layer_step import layer_step
from signround.rounding.recompute import qdq_vjp_functional

# inductor may otherwise keep fp32 precision across a `.to(float16).float()` round trip, which
# would tune on scales that are not the stored fp16 ones.
COMPILE_OPTIONS = {"emulate_precision_casts": True}
#: CUDA graphs by default up to this many tuned weights per block (see the module docstring)
GRAPHS_MAX_WEIGHTS = 24_000_000


def host_bound(tuned_weights: int) -> bool:
    """Whether a block of this many tuned weights is small enough that the host limits its steps
    (CUDA graphs by default) rather than the GPU (the compiled block forward by default)."""
    return tuned_weights <= GRAPHS_MAX_WEIGHTS


@attrs.frozen
class Runtime:
    """How tuning runs on one device: compiled qdq halves or not, block forward compiled or not,
    steps replayed from a CUDA graph or not."""

    compile: bool
    compile_block: Optional[bool]  # None: by block size (above GRAPHS_MAX_WEIGHTS)
    cuda_graphs: Optional[bool] = False  # None: by block size (up to GRAPHS_MAX_WEIGHTS)


def policy(accel: Accelerator, env: Optional[environment.Env] = None) -> Runtime:
    """The runtime for `accel`: compile on CUDA unless SIGNROUND_COMPILE says otherwise (never on HPU
    by default, where lazy mode builds its own graphs, nor on the CPU)."""
    env = env or environment.read()
    cuda = accel.device.type == "cuda"
    return Runtime(compile=env.compile if env.compile is not None else cuda,
                   compile_block=False if not cuda else env.compile_block,
                   cuda_graphs=False if not cuda else env.cuda_graphs)


_COMPILED: dict[str, Any] = {}  # per process: compiled functions are shared by every block


def _qdq_fwd(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, spec: QuantSpec,
             dtype: torch.dtype) -> Tensor:
    return qdq_tensors(grouped, wmin, wmax, v, alpha, beta, spec, v.shape[1], dtype)


def _qdq_vjp(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, spec: QuantSpec,
             dtype: torch.dtype, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return qdq_vjp_functional(grouped, wmin, wmax, v, alpha, beta, spec, v.shape[1], dtype, grad)


def _layer_step(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, spec: QuantSpec,
                dtype: torch.dtype, grad: Tensor, better: Tensor, best_codes: Tensor, best_alpha: Tensor,
                best_beta: Tensor, lr: Tensor, mlr: Tensor, tune_minmax: bool) -> None:
    layer_step(grouped, wmin, wmax, v, alpha, beta, spec, v.shape[1], dtype, grad, better, best_codes, best_alpha,
               best_beta, lr, mlr, tune_minmax)


def _dynamic(grouped: Tensor, *per_layer: Tensor) -> None:
    """Layer dims symbolic from the first call, the group size constant: one graph for every layer
    shape. (Automatic dynamic shapes would compile the probe's shape static, then recompile for the
    first new out dim and again for the first new in dim: three compiles per half instead of one.)
    A constant group size keeps the per-element group index a shift instead of a 64-bit division
    (12x slower kernels)."""
    torch._dynamo.maybe_mark_dynamic(grouped, 0)
    torch._dynamo.maybe_mark_dynamic(grouped, 1)
    torch._dynamo.mark_static(grouped, 2)
    for t in per_layer:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)


def _compiled_ops() -> QdqOps:
    if "ops" not in _COMPILED:
        fwd = torch.compile(_qdq_fwd, options=COMPILE_OPTIONS)
        vjp = torch.compile(_qdq_vjp, options=COMPILE_OPTIONS)

        def forward(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                    spec: QuantSpec, in_features: int, dtype: torch.dtype) -> Tensor:
            if v.shape[1] != in_features:  # v kept grouped: not a shape the engine makes
                return qdq_forward(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype)
            _dynamic(grouped, wmin, wmax, v, alpha, beta)
            with torch.no_grad():
                return fwd(grouped, wmin, wmax, v, alpha, beta, spec, dtype)

        def backward(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                     spec: QuantSpec, in_features: int, dtype: torch.dtype, grad: Tensor,
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            if v.shape[1] != in_features:
                return qdq_vjp(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype, grad)
            _dynamic(grouped, wmin, wmax, v, alpha, beta, grad)
            return vjp(grouped, wmin, wmax, v, alpha, beta, spec, dtype, grad)

        step = torch.compile(_layer_step, options=COMPILE_OPTIONS)

        def layer(grouped: Tensor, wmin: Tensor, wmax: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
                  spec: QuantSpec, in_features: int, dtype: torch.dtype, grad: Tensor, better: Tensor,
                  best_codes: Tensor, best_alpha: Tensor, best_beta: Tensor, lr: Tensor, mlr: Tensor,
                  tune_minmax: bool) -> None:
            if v.shape[1] != in_features:
                return layer_step(grouped, wmin, wmax, v, alpha, beta, spec, in_features, dtype, grad, better,
                                  best_codes, best_alpha, best_beta, lr, mlr, tune_minmax)
            _dynamic(grouped, wmin, wmax, v, alpha, beta, grad, best_alpha, best_beta)
            _dynamic(best_codes)
            step(grouped, wmin, wmax, v, alpha, beta, spec, dtype, grad, better, best_codes, best_alpha, best_beta,
                 lr, mlr, tune_minmax)

        _COMPILED["ops"] = QdqOps(forward=forward, vjp=backward, step=layer)
    return _COMPILED["ops"]


def _probe(ops: QdqOps, device: torch.device, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16) -> None:
    """Run the compiled halves once on a small random layer of `spec`'s grid in the weights' `dtype`
    (raises on a compiler failure; also compiles before the first timed step). The vjp runs with
    grad mode off, as inside autograd's backward: a probe with it on compiled a graph the tuning
    never used, then the tuning compiled its own."""
    gen = torch.Generator().manual_seed(0)
    gs = spec.group_size if spec.group_size > 0 else 128
    rows, cols = 64, 2 * gs
    w = torch.randn(rows, cols, generator=gen).to(device, dtype)
    gw = group_weight(w, spec)
    groups = spec.num_groups(cols)
    v = (torch.rand(rows, cols, generator=gen) - 0.5).to(device)
    a, b = torch.rand(rows, groups, generator=gen).to(device), torch.rand(rows, groups, generator=gen).to(device)
    g = torch.randn(rows, cols, generator=gen).to(device, dtype)
    ops.forward(gw.grouped, gw.wmin, gw.wmax, v, a, b, spec, cols, dtype)
    with torch.no_grad():
        codes, *_ = ops.vjp(gw.grouped, gw.wmin, gw.wmax, v, a, b, spec, cols, dtype, g)
        if ops.step is not None:
            lrs = torch.tensor([0.005, 0.005], device=device)  # two tensors: aliased ones would be a guard
            ops.step(gw.grouped, gw.wmin, gw.wmax, v, a, b, spec, cols, dtype, g, torch.ones((), dtype=torch.bool,
                     device=device), codes.clone(), a.clone(), b.clone(), lrs[0], lrs[1], True)


def qdq_ops(runtime: Runtime, device: torch.device, spec: Optional[QuantSpec] = None,
            dtype: torch.dtype = torch.bfloat16) -> QdqOps:
    """The qdq halves for this runtime: compiled (checked once per process, grid and weight dtype) or eager."""
    if not runtime.compile:
        return QdqOps(forward=qdq_forward, vjp=qdq_vjp)
    spec = spec or QuantSpec()
    key = f"checked:{device.type}:{spec.bits}:{spec.group_size}:{spec.sym}:{dtype}"
    if key not in _COMPILED:
        try:
            _probe(_compiled_ops(), device, spec, dtype)
            _COMPILED[key] = True
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager from now on
            warnings.warn(f"torch.compile of the tuning step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "running eager", RuntimeWarning, stacklevel=2)
            _COMPILED[key] = False
    return _compiled_ops() if _COMPILED[key] else QdqOps(forward=qdq_forward, vjp=qdq_vjp)


def block_call_for(runtime: Runtime, block: Any, specs: Mapping[str, QuantSpec]) -> Any:
    """How this block is called while it is tuned: `block_call` with the block compile decided by
    its size when the runtime leaves it to the size (see the module docstring)."""
    on = runtime.compile_block
    if on is None:
        on = not host_bound(sum(block.get_parameter(k).numel() for k in specs))
    return block_call(attrs.evolve(runtime, compile_block=on))


def block_call(runtime: Runtime) -> Any:
    """How blocks are called: `call_block`, or (compile_block True, CUDA) one torch.compile
    wrapper shared by every block (blocks of one list have the same code, so the graph is reused);
    a compiler failure on a call warns once and runs eager from then on."""
    if runtime.compile_block is not True:
        return call_block
    if "block" not in _COMPILED:
        _COMPILED["block"] = torch.compile(call_block)
        _COMPILED["block_ok"] = True

    def call(block: Any, params: Any, args: tuple, kwargs: dict) -> Tensor:
        if _COMPILED["block_ok"]:
            try:
                return _COMPILED["block"](block, params, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager from now on
                warnings.warn(f"torch.compile of the block failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "running eager", RuntimeWarning, stacklevel=2)
                _COMPILED["block_ok"] = False
        return call_block(block, params, args, kwargs)

    return call


def to_device(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """`inputs` on `device` (copies are asynchronous where the source allows it)."""
    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, tuple):
            return tuple(move(y) for y in x)
        return x

    return BlockInputs(hidden=move(inputs.hidden), per_sample={k: move(v) for k, v in inputs.per_sample.items()},
                       shared={k: move(v) for k, v in inputs.shared.items()}, loss_mask=move(inputs.loss_mask))


def take_rows(t: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    """Rows `idx` of `t` on `device`. From pinned host memory each row goes by its own asynchronous
    copy (a gather on the host would land in pageable memory and make the copy synchronous)."""
    if t.device.type == "cpu" and device.type == "cuda" and t.is_pinned():
        rows = idx.tolist()
        out = torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype, device=device)
        for j, r in enumerate(rows):
            out[j].copy_(t[r], non_blocking=True)
        return out
    return t.index_select(0, idx.to(t.device)).to(device, non_blocking=True)


def select(inputs: BlockInputs, idx: Tensor, device: torch.device) -> BlockInputs:
    """The samples at `idx` of inputs stored anywhere, on the compute `device`."""
    shared = to_device(BlockInputs(hidden=inputs.hidden[:0], shared=inputs.shared), device).shared
    return BlockInputs(hidden=take_rows(inputs.hidden, idx, device),
                       per_sample={k: take_rows(v, idx, device) for k, v in inputs.per_sample.items()},
                       shared=shared,
                       loss_mask=None if inputs.loss_mask is None else take_rows(inputs.loss_mask, idx, device))


def _tensors(parts: Any) -> Iterator[Tensor]:
    for batch, target in parts:
        yield batch.hidden
        yield target
        yield from batch.per_sample.values()
        if batch.loss_mask is not None:
            yield batch.loss_mask


def check_ranks(recipe: Recipe, world: int) -> None:
    """Data parallelism splits each step batch (batch_size × gradient_accumulate_steps samples)
    over `world` ranks: refuse a split that leaves a rank without a sample."""
    per_step = recipe.batch_size * recipe.gradient_accumulate_steps
    if recipe.iters and per_step < world:
        raise ValueError(f"data parallel over {world} ranks splits each step's batch of batch_size × "
                         f"gradient_accumulate_steps = {per_step} samples across the ranks; it needs at "
                         f"least one sample per rank: use batch_size >= {world}, or fewer ranks")


#: called as hook(steps done, steps in this block) after each tuning step (a progress view)
_ON_STEP: contextvars.ContextVar[Optional[Callable[[int, int], None]]] = contextvars.ContextVar("on_step", default=None)


@contextlib.contextmanager
def reporting_steps(hook: Optional[Callable[[int, int], None]]) -> Iterator[None]:
    """Within the block, `step_batches` calls `hook(t, total)` after each tuning step (t = 1..total);
    a front end's progress inside a block. The hook sees no tensors and must not sync the device."""
    token = _ON_STEP.set(hook)
    try:
        yield
    finally:
        _ON_STEP.reset(token)


def step_batches(inputs: BlockInputs, targets: Tensor, recipe: Recipe, accel: Accelerator,
                 data_parallel: Optional[DataParallel] = None) -> Iterator[StepParts]:
    """Every step's sub-batches on the compute device, as `rounding.step_batches` draws them, with
    this rank's share under data parallelism: the global step batch is cut into
    gradient_accumulate_steps × world sub-batches and rank r takes every world-th from r.

    From a host cache on CUDA, step t+1's rows are copied on a side stream while step t computes."""
    rank, world = (0, 1) if data_parallel is None else (data_parallel.rank, data_parallel.world)
    check_ranks(recipe, world)
    per_step = recipe.batch_size * recipe.gradient_accumulate_steps
    parts = recipe.gradient_accumulate_steps * world
    schedule = sample_indices(inputs.num_samples, per_step, recipe.iters, recipe.seed)
    device = accel.device

    def load(rows: Tensor) -> list[tuple[BlockInputs, Tensor]]:
        return [(select(inputs, r, device), take_rows(targets, r, device)) for r in split_step(rows, parts)[rank::world]]

    ahead = device.type == "cuda" and inputs.hidden.device.type == "cpu"
    if not ahead and inputs.hidden.device.type != "cpu" and schedule:
        # Indices go to the device once: a per-step copy from pageable memory would sync the host.
        schedule = list(torch.stack(schedule).to(inputs.hidden.device).unbind(0))
    stream = torch.cuda.Stream(device) if ahead else None
    pending = None
    on_step = _ON_STEP.get()
    for t, rows in enumerate(schedule):
        if stream is None:
            mine = load(rows)
        else:
            if pending is None:
                pending = _load_on(stream, load, rows)
            mine, ready = pending
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            for x in _tensors(mine):  # allocated on the side stream, used on this one
                x.record_stream(current)
            pending = _load_on(stream, load, schedule[t + 1]) if t + 1 < len(schedule) else None
        yield mine, int(rows.numel())
        if accel.after_step is not None:  # the step that used this batch is done
            accel.after_step()
        if on_step is not None:
            on_step(t + 1, len(schedule))


def _load_on(stream: Any, load: Any, rows: Tensor) -> tuple[Any, Any]:
    with torch.cuda.stream(stream):
        parts = load(rows)
        return parts, stream.record_event()


def tune(fn: Any, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec], inputs: BlockInputs,
         targets: Tensor, recipe: Recipe, accel: Accelerator, data_parallel: Optional[DataParallel] = None,
         runtime: Optional[Runtime] = None) -> TuneResult:
    """Tune one block with the runtime this device gets (see the module docstring)."""
    runtime = runtime or policy(accel)
    batches = step_batches(inputs, targets, recipe, accel, data_parallel)
    first = next(iter(specs), None)
    ops = qdq_ops(runtime, accel.device, specs[first] if first else None,
                  weights[first].dtype if first else torch.bfloat16)
    if uses_graphs(runtime, weights, specs) and data_parallel is None and recipe.gradient_accumulate_steps == 1:
        return graphs.tune_graphed(fn, weights, specs, recipe, batches, ops=ops, stream=_side_stream(accel.device))
    return tune_block(fn, weights, specs, inputs, targets, recipe, batches=batches, ops=ops,
                      reduce=None if data_parallel is None else data_parallel.reduce)


def for_block_list(runtime: Runtime, prefix: str) -> Runtime:
    """The runtime for the blocks of `prefix`: vision towers keep eager steps unless graphs are
    forced (their per-step inputs are packed patch layouts built by the adapters; a graph would
    hold the captured step's host-side values, and no GPU run has checked them yet)."""
    if runtime.cuda_graphs is None and is_vision_name(prefix):
        return attrs.evolve(runtime, cuda_graphs=False)
    return runtime


def uses_graphs(runtime: Runtime, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec]) -> bool:
    """Whether this block's steps are replayed from a CUDA graph under `runtime`."""
    if not specs or runtime.cuda_graphs is False:
        return False
    return runtime.cuda_graphs is True or host_bound(sum(weights[k].numel() for k in specs))


def _side_stream(device: torch.device) -> Any:
    """One stream per device for the graphs' warm-up and capture (CUDA graphs capture off the
    default stream)."""
    key = f"stream:{device}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.cuda.Stream(device)
    return _COMPILED[key]
