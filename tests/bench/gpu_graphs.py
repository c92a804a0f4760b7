"""CUDA graphs vs eager steps (issue 13): same values? how much faster? One process, same model and data.

For each block shape (SmolLM2-135M's, Qwen2-VL-2B's), a random decoder of 3 blocks is quantized
twice with the default recipe, SIGNROUND_CUDA_GRAPHS off then on (everything else equal), and the
two results compared tensor for tensor (every saved weight, scale and zero; every block loss).

    python3 tests/bench/gpu_graphs.py --json out.json         # on a CUDA machine
    python3 tests/bench/gpu_graphs.py --device cpu --tiny     # a dry run (graphs are CUDA-only: both eager)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from signround.adapters.engine import graphs
from signround.adapters.frontends.bench import BenchConfig, _quantize, _resolve, build_model, make_batches, steady
from signround.rounding import QuantSpec, preset

SHAPES = {
    "smol": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, model_type="llama", seqlen=512,
                 group_size=64),
    "2b": dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936, seqlen=2048, group_size=128),
    "tiny": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, seqlen=64, group_size=32),
}


def one(name: str, args: argparse.Namespace) -> dict:
    cfg = BenchConfig.preset("tiny" if name == "tiny" else "2b", layers=args.layers, device=args.device,
                             iters=args.iters, nsamples=args.nsamples, **SHAPES[name])
    accel = _resolve(cfg)
    dtype = torch.float32 if accel.device.type == "cpu" else torch.bfloat16
    batches = make_batches(cfg)
    spec = QuantSpec(bits=4, group_size=cfg.group_size, sym=True)
    recipe = preset("default", iters=cfg.iters, nsamples=cfg.nsamples, seqlen=cfg.seqlen, batch_size=cfg.batch_size)
    fp = build_model(cfg, torch.device("cpu"), dtype)
    runs = {}
    for mode in ("eager", "graphs"):
        os.environ["SIGNROUND_CUDA_GRAPHS"] = "1" if mode == "graphs" else "0"
        model = copy.deepcopy(fp).to(accel.device)
        start = time.perf_counter()
        model, report = _quantize(model, batches, spec, recipe, accel, None)
        runs[mode] = {"seconds": time.perf_counter() - start, "per_block": [b.seconds for b in report.blocks],
                      "loss_tuned": [b.loss_tuned for b in report.blocks],
                      "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "peak_memory_bytes": report.peak_memory_bytes}
        del model
        if accel.device.type == "cuda":
            torch.cuda.empty_cache()
    a, b = runs["eager"]["state"], runs["graphs"]["state"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    out = {"shape": name, "config": cfg.to_dict(), "graphs_failure": graphs.failure(), "tensors": len(a),
           "tensors_differ": differ[:10], "n_differ": len(differ),
           "losses_equal": runs["eager"]["loss_tuned"] == runs["graphs"]["loss_tuned"]}
    for mode, r in runs.items():
        r.pop("state")
        out[mode] = {**r, "steady_seconds_per_block": steady(r["per_block"])}
    out["speedup_steady"] = out["eager"]["steady_seconds_per_block"] / out["graphs"]["steady_seconds_per_block"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smol,2b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="the tiny shape, 20 iters, 16 samples")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.iters, args.nsamples = "tiny", args.iters or 20, args.nsamples or 16
    results = []
    for name in args.shapes.split(","):
        r = one(name, args)
        results.append(r)
        print(f"{name}: eager {r['eager']['steady_seconds_per_block']:.3f} s/block, graphs "
              f"{r['graphs']['steady_seconds_per_block']:.3f} ({r['speedup_steady']:.2f}x); peak "
              f"{r['eager']['peak_memory_bytes']} vs {r['graphs']['peak_memory_bytes']}; tensors differ "
              f"{r['n_differ']}/{r['tensors']}; losses equal {r['losses_equal']}; failure {r['graphs_failure']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
