"""Tuning steps replayed from one CUDA graph per block (runtime policy: when, in `runtime.py`).

On small blocks the GPU finishes a step long before Python has launched it: at SmolLM2-135M's
block dimensions a step is ~2.4 ms of kernels behind ~10 ms of host work (dispatch, autograd, the
compiled qdq halves' wrappers). A donated fused step (`rounding.tune.step(..., donate=True)` on one
sub-batch) touches only buffers it is handed: the state's params, optimizer step count and best
iterate, updated in place, and the batch. So it can be captured once and replayed: the first
`WARMUP` steps run eagerly (they are real steps, and they compile and allocate everything), the
next one is captured with the batch in static buffers, and every later step copies its rows into
those buffers and replays. The kernels and their order are those of the eager step, so the
values are the eager path's: on an H200 every saved tensor and block loss was equal at SmolLM2's
and Qwen2-VL-2B's block dimensions (`tests/bench/gpu_graphs.py`), and a SmolLM2-shaped block
took 0.36 s instead of 2.59 s.

Not captured (eager as before): gradient accumulation, data parallelism (the cross-rank reduce
synchronises the host), devices other than CUDA, and blocks whose capture fails: capture runs in
torch's "global" error mode, so an op that synchronises or reads the host (Qwen2-VL's vision
attention splits by `cu_seqlens.tolist()`) raises there instead of being recorded with this step's
host values. A failed capture warns once and such blocks (blocks with the same layer names) then run
eagerly: the values are the same. The last warm-up step runs under torch's sync debug mode and what
it reports is kept (`warmup_syncs`), to name the op when a capture fails. It does not stop the
capture: on an H200 it flagged SmolLM2-shaped text blocks whose capture had replayed bit for bit
(2026-12-02: 2.59 s per block eager vs 0.36 s captured, before the check existed).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from signround.rounding import BlockInputs, QdqOps, QuantSpec, Recipe, StepParts, TuneResult
from signround.rounding.tune import BlockFn, TuneState, finish, init, optimizer_for, prepare, step

WARMUP = 3  # eager steps before the capture: the compiled halves and every buffer exist by then

#: capture(fn, stream) -> replay: records fn's kernels without running them; replay() runs them
#: and returns fn's (static) output
Capture = Callable[[Callable[[], Tensor], Any], Callable[[], Tensor]]

_FAILED: dict[tuple, str] = {}  # per process and block layout (its tuned weight names): why not captured
_SYNCED: dict[tuple, str] = {}  # per block layout: what the sync debug mode reported in its last warm-up step


def cuda_capture(fn: Callable[[], Tensor], stream: Any) -> Callable[[], Tensor]:
    """One CUDA graph of `fn`'s kernels (captured on `stream`)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()

    def replay() -> Tensor:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]  # the graph lives as long as its replay
    return replay


def deferred_capture(fn: Callable[[], Tensor], stream: Any) -> Callable[[], Tensor]:
    """A stand-in for `cuda_capture` off CUDA (tests): records nothing, each replay runs `fn`
    again on the same static buffers, as a graph replay would."""
    return fn


def synchronises(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run `fn`; what torch's sync debug mode reported while it ran (it warns and goes on, so the step
    completes as usual): empty when it never synchronised the host with the device."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in caught:  # everything else is the caller's to see
        if w not in syncs:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, [f"{w.filename}:{w.lineno}: {str(w.message)[:160]}" for w in syncs]


def _static(parts: Sequence[tuple[BlockInputs, Tensor]]) -> list[tuple[BlockInputs, Tensor]]:
    """Buffers for one step's batch, of its shapes (shared inputs are the same every step)."""
    out = []
    for batch, target in parts:
        out.append((BlockInputs(hidden=batch.hidden.clone(), per_sample={k: v.clone() for k, v in batch.per_sample.items()},
                                shared=batch.shared,
                                loss_mask=None if batch.loss_mask is None else batch.loss_mask.clone()),
                    target.clone()))
    return out


def _fill(static: Sequence[tuple[BlockInputs, Tensor]], parts: Sequence[tuple[BlockInputs, Tensor]]) -> bool:
    """Copy a step's batch into the static buffers; False when its shapes differ (then it runs eagerly)."""
    if len(static) != len(parts):
        return False
    pairs = []
    for (sb, st), (b, t) in zip(static, parts):
        if sb.per_sample.keys() != b.per_sample.keys() or (sb.loss_mask is None) != (b.loss_mask is None):
            return False
        pairs += [(sb.hidden, b.hidden), (st, t)] + [(sb.per_sample[k], b.per_sample[k]) for k in sb.per_sample]
        if sb.loss_mask is not None:
            pairs.append((sb.loss_mask, b.loss_mask))
    if any(d.shape != s.shape or d.dtype != s.dtype for d, s in pairs):
        return False
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)
    return True


def capturable(parts: StepParts) -> bool:
    """A step the fused in-place path runs: one sub-batch holding all of the step's samples."""
    subs, total = parts
    return len(subs) == 1 and subs[0][0].num_samples == total


def tune_graphed(block_fn: BlockFn, weights: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
                 recipe: Recipe, batches: Iterable[StepParts], *, ops: QdqOps = QdqOps(),
                 capture: Capture = cuda_capture, stream: Any = None, warmup: int = WARMUP,
                 sync_check: Optional[Callable[[Callable[[], Any]], tuple[Any, list[str]]]] = None) -> TuneResult:
    """`rounding.tune_block` with every step after the first `warmup` replayed from one capture.

    The loop is the core's public steps (prepare, init, step, result); only how a step is launched
    changes. `stream`: the CUDA stream the warm-up and the capture run on (a side stream, as CUDA
    graphs require); replays run on the caller's stream. sync_check: runs the last warm-up step and
    says where it synchronised the host (default: `synchronises` on CUDA, none elsewhere)."""
    if sync_check is None and stream is not None:
        sync_check = synchronises
    prepared = prepare(weights, specs)
    state = init(prepared, specs, recipe, optimizer_for(recipe))
    losses: list[Tensor] = []
    replay: Optional[Callable[[], Tensor]] = None
    static: Optional[list[tuple[BlockInputs, Tensor]]] = None

    key = tuple(sorted(specs))

    def eager(parts: StepParts, check: bool = False) -> None:
        nonlocal state

        def run() -> tuple[TuneState, Tensor]:
            if not (check and sync_check is not None):
                return step(block_fn, weights, prepared, specs, state, parts, ops=ops, donate=True)
            out, syncs = sync_check(lambda: step(block_fn, weights, prepared, specs, state, parts, ops=ops, donate=True))
            if syncs:
                _SYNCED[key] = "; ".join(sorted(set(syncs)))[:400]
            return out

        if stream is None:
            state, loss = run()
        else:  # on the side stream, ordered after the batch's copies and before what follows
            main = torch.cuda.current_stream(stream.device)
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                state, loss = run()
            main.wait_stream(stream)
        losses.append(loss)

    for parts in batches:
        if (replay is None and len(losses) < warmup) or not capturable(parts) or key in _FAILED:
            eager(parts, check=replay is None and len(losses) == warmup - 1 and key not in _FAILED)
            continue
        if replay is None:
            static, total, captured = _static(parts[0]), parts[1], state

            def one_step() -> Tensor:
                _, loss = step(block_fn, weights, prepared, specs, captured, (static, total), ops=ops, donate=True)
                return loss

            try:
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(stream.device))
                replay = capture(one_step, stream)
                if stream is not None:
                    torch.cuda.current_stream(stream.device).wait_stream(stream)
            except Exception as exc:  # noqa: BLE001 - anything the block does that a graph cannot hold
                _FAILED[key] = f"{type(exc).__name__}: {str(exc)[:200]}" + (
                    f" (its last warm-up step synchronised the host: {_SYNCED[key]})" if key in _SYNCED else "")
                warnings.warn(f"CUDA graph capture of the tuning step failed ({_FAILED[key]}); running "
                              "blocks of this layout eagerly (same values)", RuntimeWarning, stacklevel=2)
                if stream is not None:
                    torch.cuda.synchronize(stream.device)  # raises if the failed capture broke the context
                eager(parts)
                continue
        assert static is not None
        if not _fill(static, parts[0]):
            eager(parts)
            continue
        losses.append(replay().clone())  # the replay's loss buffer is overwritten by the next one
    return finish(state, prepared, specs, recipe, losses)


def failures() -> dict[str, str]:
    """Every block layout (its tuned weight names, abbreviated) that runs without graphs, and why."""
    return {", ".join(k[:3]) + (", …" if len(k) > 3 else ""): why for k, why in _FAILED.items()}


def warmup_syncs() -> dict[str, str]:
    """Every block layout whose last warm-up step synchronised the host, and where (captured or not)."""
    return {", ".join(k[:3]) + (", …" if len(k) > 3 else ""): why for k, why in _SYNCED.items()}


def failure() -> Optional[str]:
    """Why some block layout runs without graphs in this process (None while all are captured)."""
    return next(iter(_FAILED.values()), None)


__all__ = ["Capture", "WARMUP", "capturable", "cuda_capture", "deferred_capture", "failure", "failures", "synchronises",
           "tune_graphed", "warmup_syncs"]
