"""GPU checks of the fast path that CI (no GPU) cannot make; run on a lent GPU before timing.

1. Compiled vs eager qdq halves on real layer shapes (bf16 weights, W4 G128 sym and asym): the
   fraction of equal codes and of equal v gradients, and the largest relative alpha/beta gradient
   difference — the tolerance `spec/rounding.md` states for the compiled path.
2. tune_block on a small two-layer block on CUDA: eager vs compiled ops (loss history), and the
   engine's step batches from a pinned host cache vs from the device (must be identical).

    python3 tests/bench/gpu_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from signround.adapters.engine import runtime
from signround.adapters.engine.device import resolve
from signround.rounding import BlockInputs, QuantSpec, Recipe, group_weight, qdq_vjp, tune_block


def random_layer(out_f: int, in_f: int, spec: QuantSpec, dev, seed: int = 0) -> tuple:
    """(grouped weight, v, alpha, beta, output gradient) of a random bf16 layer [out_f, in_f] on `dev`:
    weights of an LLM's scale, v within ±0.1, alpha/beta in [0.9, 1]."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(out_f, in_f, device=dev, generator=gen) * 0.02).bfloat16()
    groups = spec.num_groups(in_f)
    v = (torch.rand(out_f, in_f, device=dev, generator=gen) - 0.5) * 0.2
    a = 1 - 0.1 * torch.rand(out_f, groups, device=dev, generator=gen)
    b = 1 - 0.1 * torch.rand(out_f, groups, device=dev, generator=gen)
    g = torch.randn(out_f, in_f, device=dev, generator=gen).bfloat16()
    return group_weight(w, spec), v, a, b, g


def _layer_check(out_f: int, in_f: int, sym: bool, ops, dev) -> dict:
    spec = QuantSpec(bits=4, group_size=128, sym=sym)
    gw, v, a, b, g = random_layer(out_f, in_f, spec, dev)
    args = (gw.grouped, gw.wmin, gw.wmax, v, a, b, spec, in_f, torch.bfloat16)
    e = qdq_vjp(*args, g)
    c = ops.vjp(*args, g)
    f_e = runtime.qdq_forward(*args)
    f_c = ops.forward(*args)

    def rel(x, y):
        return float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        ops.vjp(*args, g)
    torch.cuda.synchronize()
    t_c = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    for _ in range(10):
        qdq_vjp(*args, g)
    torch.cuda.synchronize()
    t_e = (time.perf_counter() - t0) / 10
    return {"shape": [out_f, in_f], "sym": sym,
            "forward_equal_fraction": float((f_e == f_c).float().mean()),
            "codes_equal_fraction": float((e[0] == c[0]).float().mean()),
            "grad_v_equal_fraction": float((e[1] == c[1]).float().mean()),
            "grad_v_sign_equal_fraction": float((torch.sign(e[1]) == torch.sign(c[1])).float().mean()),
            "grad_alpha_rel_max": rel(c[2], e[2]), "grad_beta_rel_max": rel(c[3], e[3]),
            "grad_alpha_sign_equal_fraction": float((torch.sign(e[2]) == torch.sign(c[2])).float().mean()),
            "vjp_ms_compiled": t_c * 1e3, "vjp_ms_eager": t_e * 1e3}


def _block(weights, batch):
    h = torch.nn.functional.silu(batch.hidden @ weights["up"].t())
    return batch.hidden + h @ weights["down"].t()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    accel = resolve("cuda")
    ops = runtime.qdq_ops(runtime.Runtime(compile=True, compile_block=False), dev)
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "compiled": ops.vjp is not qdq_vjp, "layers": []}
    for shape in ((4096, 4096), (14336, 4096), (4096, 14336)):
        for sym in (True, False):
            out["layers"].append(_layer_check(*shape, sym, ops, dev))
    gen = torch.Generator(device=dev).manual_seed(1)
    d, hdim, n = 512, 1024, 32
    weights = {"up": (torch.randn(hdim, d, device=dev, generator=gen) / d**0.5).bfloat16(),
               "down": (torch.randn(d, hdim, device=dev, generator=gen) / hdim**0.5).bfloat16()}

    def block(w, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _block(w, batch)

    x = torch.randn(n, 64, d, device=dev, generator=gen).bfloat16()
    targets = block(weights, BlockInputs(hidden=x)).bfloat16()
    specs = {"up": QuantSpec(bits=4, group_size=128), "down": QuantSpec(bits=4, group_size=128, sym=False)}
    recipe = Recipe(iters=50, nsamples=n, batch_size=8)
    eager = tune_block(block, weights, specs, BlockInputs(hidden=x), targets, recipe,
                       batches=runtime.step_batches(BlockInputs(hidden=x), targets, recipe, accel))
    host_x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    host_t = torch.empty(targets.shape, dtype=targets.dtype, pin_memory=True).copy_(targets)
    hosted = tune_block(block, weights, specs, BlockInputs(hidden=host_x), host_t, recipe,
                        batches=runtime.step_batches(BlockInputs(hidden=host_x), host_t, recipe, accel))
    fast = tune_block(block, weights, specs, BlockInputs(hidden=x), targets, recipe, ops=ops,
                      batches=runtime.step_batches(BlockInputs(hidden=x), targets, recipe, accel))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        tune_block(block, weights, specs, BlockInputs(hidden=x), targets, recipe, ops=ops,
                   batches=runtime.step_batches(BlockInputs(hidden=x), targets, recipe, accel))
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
    out["host_syncs_in_50_iters"] = {"count": len(syncs), "first": syncs[:3]}
    out["tune"] = {"host_cache_equals_device_cache": bool(torch.equal(eager.losses, hosted.losses)) and all(
                       torch.equal(eager.quantized[k].codes, hosted.quantized[k].codes) for k in specs),
                   "compiled_loss_rel_max": float(((fast.losses - eager.losses).abs() / eager.losses).max()),
                   "compiled_final_loss": float(fast.losses[-1]), "eager_final_loss": float(eager.losses[-1]),
                   "compiled_codes_equal_fraction": {k: float((fast.quantized[k].codes == eager.quantized[k].codes)
                                                             .float().mean()) for k in specs}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
