"""Where one tuning step's time goes: our step against a plain training step of the same block.

    python tests/bench/step_floor.py --dims 8b --json floor-8b.json            # on a GPU
    python tests/bench/step_floor.py --dims 8b --profile prof-8b-steps        # + kernel classes per step
    python tests/bench/step_floor.py --dims tiny --device cpu --steps 2       # a dry run on a CPU

One block of `signround bench`'s random model of the named dims (a 1-layer copy), one step batch
(default recipe: 8 × 2048 tokens) already on the device, the engine's runtime (compiled qdq halves,
the block call the engine picks for this size). Rows, milliseconds per step (CUDA events over
`--steps` steps after `--warmup`):

- fwd: the block forward without autograd (the unit of the scoring passes);
- train: forward + backward for the tuned layers' weight gradients in the weights' dtype: the same
  GEMMs a SignRound step runs (forward, dX, dW) and nothing else, i.e. the floor of any step;
- qdq: our qdq forward + vjp + best-iterate select + signed step of every tuned layer, without the
  block (what a step adds to `train` if nothing overlapped);
- ours: `rounding.tune.step` (donated state, fused in-backward step), the step the engine runs;
- ours_unfused: the same with the layer step as separate ops (vjp, then select and signed step);
- ours_contiguous: the layer step handed a contiguous copy of its output gradient (the layouts the
  block's backward gives are printed: a transposed dW makes the step's loads strided);
- engine: the engine's `tune` phase of a real block (host cache, rows copied ahead) per step, and
  that block's other phases (s).

`ours - train` is what the method costs beyond the GEMMs; `(ours - train) - qdq` is what is lost
to the order of work (serial kernels, copies). With `--profile DIR`, 10 `ours` steps run under
torch.profiler and the kernel time per step is split into classes (GEMM, attention, inductor
triton, elementwise, copies, other); DIR/ops.txt holds the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from signround.adapters import as_pure, capture_inputs, find_block_lists, quantize_model
from signround.adapters.engine import runtime
from signround.adapters.engine.device import resolve, synchronize
from signround.adapters.frontends.bench import DIMS, BenchConfig, build_model, make_batches
from signround.adapters.hf.blocks import blocks_of
from signround.rounding import QuantSpec, masked_mse, preset
from signround.rounding import best as best_iterate
from signround.rounding import tune as core
from signround.rounding.params import RoundingParams

# First match wins: inductor's kernels are named after their ops ("triton_per_fused__to_copy_…"), so
# they are classed before copies; flash attention's cutlass kernels before GEMMs.
CLASSES = [("triton", re.compile(r"^triton_", re.I)),
           ("attention", re.compile(r"flash|fmha|sdpa|attention|cudnn", re.I)),
           ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|cublas|_mm_|bmm|sm90_xmma", re.I)),
           ("copies", re.compile(r"memcpy|memset|copy", re.I)),
           ("elementwise", re.compile(r"elementwise|vectorized|reduce|index|where|fill|cat", re.I))]


def timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Milliseconds per call of `fn` after `warmup` calls (CUDA events; wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) * 1000 / steps


def kernel_classes(prof: Any, steps: int) -> dict[str, float]:
    """Device milliseconds per step by kernel class."""
    out = {name: 0.0 for name, _ in CLASSES} | {"other": 0.0}
    cuda = torch.autograd.DeviceType.CUDA
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != cuda:
            continue
        us = float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        name = next((n for n, rx in CLASSES if rx.search(e.key)), "other")
        out[name] += us / 1000 / steps
    out["total"] = sum(out.values())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="8b", choices=sorted(DIMS))
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--engine-iters", type=int, default=50, help="iterations of the engine row's block (0: skip)")
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    accel = resolve(a.device)
    dev = accel.device
    cfg = BenchConfig.preset(a.dims, layers=1, device=str(dev))
    dtype = getattr(torch, cfg.dtype)
    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=True)
    recipe = preset("default", iters=a.steps + a.warmup + 10, nsamples=cfg.batch_size, seqlen=cfg.seqlen,
                    batch_size=cfg.batch_size)
    model = build_model(cfg, dev, dtype, layers=1)
    prefix = find_block_lists(model)[0]
    block = blocks_of(model, prefix)[0]
    batches = make_batches(attrs.evolve(cfg, nsamples=cfg.batch_size))
    cap = capture_inputs(model, batches, prefix, nsamples=cfg.batch_size, store_device=dev,
                         dtype=accel.cache_dtype, shared_device=dev)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    specs = {f"{n}.weight": spec for n in names}
    run_policy = runtime.policy(accel)
    fn, weights = as_pure(block, cap.calls[0].layout, autocast_dtype=accel.autocast_dtype,
                          call=runtime.block_call_for(run_policy, block, specs))
    inputs = cap.block_inputs(0)
    with torch.no_grad():
        target = fn(weights, inputs).to(inputs.hidden.dtype)
    target = target + 0.01 * torch.randn_like(target)  # a loss away from zero, as a quantized block has
    ops = runtime.qdq_ops(run_policy, dev, spec, dtype)
    rows: dict[str, Any] = {}

    def fwd() -> None:
        with torch.no_grad():
            fn(weights, inputs)

    leaves = {k: weights[k].detach().clone().requires_grad_(True) for k in specs}

    def train() -> None:
        loss = masked_mse(fn({**weights, **leaves}, inputs), target, inputs.loss_mask)
        torch.autograd.grad(loss * core.LOSS_SCALE, list(leaves.values()))

    prepared = core.prepare(weights, specs)
    state = core.init(prepared, specs, recipe)
    grads = {k: torch.randn(weights[k].shape, device=dev, dtype=dtype) for k in specs}
    better = torch.ones((), dtype=torch.bool, device=dev)

    def qdq() -> None:
        for k, g in prepared.items():
            prm = state.params[k]
            ops.forward(g.grouped, g.wmin, g.wmax, prm.v, prm.alpha, prm.beta, spec, g.in_features, g.dtype)
            codes, gv, ga, gb = ops.vjp(g.grouped, g.wmin, g.wmax, prm.v, prm.alpha, prm.beta, spec, g.in_features,
                                        g.dtype, grads[k])
            best_iterate.select(state.best, k, better, codes, prm, donate=True)
            state.optimizer.update_layer(RoundingParams(gv, ga, gb), state.opt, prm, donate=True)

    ours_state = [core.init(prepared, specs, recipe)]
    unfused_ops = attrs.evolve(ops, step=None)

    def ours(step_ops: Any = ops) -> None:
        ours_state[0], _ = core.step(fn, weights, prepared, specs, ours_state[0], ([(inputs, target)], cfg.batch_size),
                                     ops=step_ops, donate=True)

    def ours_unfused() -> None:
        ours(unfused_ops)

    layouts: dict[str, Any] = {}

    def probing_step(*args: Any) -> None:  # what the block's backward hands each layer's step
        grad = args[9]
        layouts.setdefault(f"{tuple(grad.shape)}", {"stride": list(grad.stride()), "contiguous": grad.is_contiguous()})
        ops.step(*args)

    def contiguous_step(*args: Any) -> None:
        ops.step(*args[:9], args[9].contiguous(), *args[10:])

    contig_ops = attrs.evolve(ops, step=contiguous_step) if ops.step is not None else ops

    def ours_contiguous() -> None:
        ours(contig_ops)

    if ops.step is not None:
        ours_state[0] = core.init(prepared, specs, recipe)
        ours(attrs.evolve(ops, step=probing_step))
        rows["grad_layouts"] = layouts
        print("gradient layouts the layer step receives:", layouts, flush=True)

    for name, f in (("fwd", fwd), ("train", train), ("qdq", qdq), ("ours", ours), ("ours_unfused", ours_unfused),
                    ("ours_contiguous", ours_contiguous)):
        ours_state[0] = core.init(prepared, specs, recipe)
        rows[name] = timed(f, a.steps, a.warmup, dev)
        print(f"{name:12} {rows[name]:9.2f} ms/step", flush=True)
    # The fused layer step against the unfused one from the same start: equal params after 5 steps?
    finals = []
    for step_ops in (ops, unfused_ops):
        ours_state[0] = core.init(prepared, specs, recipe)
        for _ in range(5):
            ours(step_ops)
        finals.append(ours_state[0])
    rows["fused_equals_unfused"] = {
        "v": all(torch.equal(finals[0].params[k].v, finals[1].params[k].v) for k in specs),
        "alpha_equal_share": float(sum((finals[0].params[k].alpha == finals[1].params[k].alpha).sum() for k in specs)
                                   / sum(finals[0].params[k].alpha.numel() for k in specs)),
        "codes": all(torch.equal(finals[0].best.codes[k], finals[1].best.codes[k]) for k in specs)}
    print("fused == unfused after 5 steps:", rows["fused_equals_unfused"], flush=True)
    rows["fused_step_saves_ms"] = rows["ours_unfused"] - rows["ours"]
    rows["ours_minus_train"] = rows["ours"] - rows["train"]
    rows["lost_to_order"] = rows["ours"] - rows["train"] - rows["qdq"]
    tuned = sum(weights[k].numel() for k in specs)
    tokens = cfg.batch_size * cfg.seqlen
    rows["gemm_tflop_per_step"] = 6 * tuned * tokens / 1e12
    rows["train_tflops"] = rows["gemm_tflop_per_step"] / (rows["train"] / 1000)
    rows["ours_tflops"] = rows["gemm_tflop_per_step"] / (rows["ours"] / 1000)

    if a.profile is not None and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        a.profile.mkdir(parents=True, exist_ok=True)
        ours_state[0] = core.init(prepared, specs, recipe)
        synchronize(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                ours()
            synchronize(dev)
        rows["ours_kernel_ms_per_step"] = kernel_classes(prof, 10)
        (a.profile / "ops.txt").write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60))
        print("kernel ms per step:", {k: round(v, 2) for k, v in rows["ours_kernel_ms_per_step"].items()}, flush=True)

    if a.engine_iters > 0:
        full = attrs.evolve(cfg, nsamples=128 if dev.type == "cuda" else cfg.nsamples)
        eng_recipe = preset("default", iters=a.engine_iters, nsamples=full.nsamples, seqlen=cfg.seqlen,
                            batch_size=cfg.batch_size)
        data = make_batches(full)
        for layers in (1, 2):  # the first run compiles; block 1 of the second is the measurement
            m = build_model(cfg, dev, dtype, layers=layers)
            _, report = quantize_model(m, data, spec, eng_recipe, device=accel)
            del m
        phases = dict(report.blocks[-1].phases)
        rows["engine_phases_s"] = phases
        rows["engine"] = phases.get("tune", float("nan")) * 1000 / a.engine_iters
        print(f"engine   {rows['engine']:9.2f} ms/step   phases {({k: round(v, 3) for k, v in phases.items()})}")
    rows.update(dims=a.dims, device=str(dev), torch=torch.__version__, steps=a.steps,
                gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)
    print(json.dumps(rows, default=str))
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
