"""`signround bench`: per-block tuning time, peak memory and final block loss, signround vs auto-round.

A random Qwen2 decoder with Qwen2-VL-2B text dimensions (hidden 1536, intermediate 8960, 12 heads /
2 KV heads, 4 layers), random calibration tokens, the default recipe (200 iters, 128 × 2048, bs 8),
W4 G128 sym. When `auto_round` imports, the same model copy and data go through auto-round in the
same process, and both results are scored the same way: each quantized block's MSE to the fp
block output, on the quantized-input chain (as tuning sees it), over all calibration samples.

    signround bench                                          # full size (GPU), vs auto-round if installed
    python tests/bench/bench_engine.py --tiny               # seconds on a CPU
    python tests/bench/bench_engine.py --nsamples 32 --seqlen 512 --iters 50 --no-auto-round

Data parallel (one process per GPU, each step's batch split across ranks; auto-round is skipped):

    torchrun --nproc-per-node 2 -m signround bench --no-reference

Environment: SIGNROUND_COMPILE=0 runs the step eagerly on CUDA; SIGNROUND_COMPILE_BLOCK=1 also
compiles the block forward (faster steps, ~30 s more compile once per process).

Prints a table and one JSON line (prefix `RESULT `) with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from signround.adapters import as_pure, capture_inputs, find_block_lists, quantize_model, run_block
from signround.adapters.engine import distributed
from signround.adapters.hf.blocks import blocks_of
from signround.adapters.engine.device import peak_memory, reset_peak_memory, resolve, synchronize
from signround.rounding import QuantSpec, preset

TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, iters=5, nsamples=8,
            seqlen=32, batch_size=4)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: auto)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="model dtype on accelerators (always float32 on cpu)")
    p.add_argument("--low-gpu-mem-usage", action="store_true")
    p.add_argument("--no-auto-round", action="store_true", help="skip auto-round even if it is installed")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run: " + str(TINY))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    cfg = AutoConfig.for_model("qwen2", hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=32768,
                               rope_theta=1e6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def block_losses(fp_model: Any, q_model: Any, batches: list[torch.Tensor], args: argparse.Namespace,
                 accel: Any) -> list[float]:
    """MSE(B_q(X_q), B_fp(X_fp)) per block over all samples: the same score for any quantizer."""
    p = next(fp_model.parameters())
    q_model.to(device=p.device, dtype=p.dtype)  # auto-round casts to bf16 on CPU; the cast back is exact
    prefix = find_block_lists(fp_model)[0]
    cap = capture_inputs(fp_model, batches, prefix, nsamples=args.nsamples, store_device=accel.store_device)
    x_fp = x_q = cap.hidden
    losses = []
    for i, (b_fp, b_q) in enumerate(zip(blocks_of(fp_model, prefix), blocks_of(q_model, prefix))):
        fn_fp, w_fp = as_pure(b_fp, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
        fn_q, w_q = as_pure(b_q, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
        target, _ = run_block(fn_fp, w_fp, cap.block_inputs(i, x_fp), accel, args.batch_size)
        out, loss = run_block(fn_q, w_q, cap.block_inputs(i, x_q), accel, args.batch_size, target)
        losses.append(float(loss))
        x_fp, x_q = target, out
    return losses


def dummy_tokenizer(vocab: int) -> Any:
    """auto-round insists on a tokenizer even for tensor data; a word-level one over the id range does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t2", eos_token="t1")


def run_auto_round(model: Any, batches: list[torch.Tensor], args: argparse.Namespace) -> Optional[dict[str, Any]]:
    try:
        from auto_round import AutoRound
    except ImportError:
        return None
    logged: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    stamps: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "layers in the block" in record.getMessage():
                stamps.append(time.perf_counter())

    for name in ("autoround", "auto_round"):
        logging.getLogger(name).addHandler(Grab())
        logging.getLogger(name).addHandler(Stamp())
    device = next(model.parameters()).device
    reset_peak_memory(device)
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer=dummy_tokenizer(args.vocab), bits=args.bits, group_size=args.group_size, sym=True, iters=args.iters,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dataset=batches, seed=42)
    ar.quantize()
    synchronize(device)
    seconds = time.perf_counter() - start
    mem, _ = peak_memory(device)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # block i+1's time = gap between "done" lines
    return {"seconds": seconds, "seconds_per_block": seconds / args.layers, "peak_memory_bytes": mem,
            "steady_seconds_per_block": (sorted(gaps)[len(gaps) // 2] if gaps else None),
            "loss_log": [m for m in logged if "loss" in m][-args.layers:], "model": ar.model}


def run_bench(*, layers: int = 4, hidden: int = 1536, intermediate: int = 8960, heads: int = 12, kv_heads: int = 2,
              iters: int = 200, nsamples: int = 128, seqlen: int = 2048, batch_size: int = 8,
              device: Optional[str] = None, reference: bool = True, json_out: Any = None,
              **extra: Any) -> dict[str, Any]:
    """Run the benchmark (see the module docstring), print the table and return every number;
    `json_out`: also write them there as JSON. `reference=False` skips auto-round."""
    argv = ["--layers", str(layers), "--hidden", str(hidden), "--intermediate", str(intermediate),
            "--heads", str(heads), "--kv-heads", str(kv_heads), "--iters", str(iters), "--nsamples", str(nsamples),
            "--seqlen", str(seqlen), "--batch-size", str(batch_size)]
    if device is not None:
        argv += ["--device", device]
    if not reference:
        argv.append("--no-auto-round")
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    result = main(argv)
    dp = distributed.from_env()  # already initialised by main(): this only reads the rank
    if json_out is not None and (dp is None or dp.is_main):  # one writer under torchrun
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, default=str, indent=1)
    return result


def _steady(per_block: list[float]) -> float:
    """Median seconds per block after the first (the first carries compile and warm-up)."""
    rest = sorted(per_block[1:]) or per_block
    return rest[len(rest) // 2]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    dp = distributed.from_env()
    if dp is not None:
        args.no_auto_round = True  # auto-round has no data-parallel block tuning to compare with
        args.device = args.device or dp.device()
    accel = resolve(args.device, low_gpu_mem_usage=args.low_gpu_mem_usage)
    dtype = getattr(torch, args.dtype) if accel.is_accelerator else torch.float32
    fp_model = build_model(args, accel.device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, args.vocab, (args.nsamples, args.seqlen), generator=gen)
    batches = [ids[i:i + args.batch_size] for i in range(0, args.nsamples, args.batch_size)]
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, sym=True)
    recipe = preset("default", iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)

    ours = copy.deepcopy(fp_model)
    start = time.perf_counter()
    ours, report = quantize_model(ours, batches, spec, recipe, device=accel, progress=False, data_parallel=dp)
    total = time.perf_counter() - start
    per_block = [b.seconds for b in report.blocks]
    result: dict[str, Any] = {
        "device": str(accel.device), "gpu": torch.cuda.get_device_name() if accel.device.type == "cuda" else None,
        "torch": torch.__version__, "args": vars(args), "world_size": 1 if dp is None else dp.world,
        "signround": {"seconds": total, "seconds_per_block": per_block, "mean_seconds_per_block": sum(per_block) / len(per_block),
                      "steady_seconds_per_block": _steady(per_block),
                      "peak_memory_bytes": report.peak_memory_bytes, "peak_memory_kind": report.peak_memory_kind,
                      "report_loss_rtn": [b.loss_rtn for b in report.blocks],
                      "report_loss_tuned": [b.loss_tuned for b in report.blocks]},
    }
    result["signround"]["block_loss"] = block_losses(fp_model, ours, batches, args, accel)
    del ours
    ar = None if args.no_auto_round else run_auto_round(copy.deepcopy(fp_model), batches, args)
    if ar is not None:
        ar["block_loss"] = block_losses(fp_model, ar.pop("model"), batches, args, accel)
        result["auto_round"] = ar
        result["speedup_per_block"] = ar["seconds_per_block"] / result["signround"]["mean_seconds_per_block"]
        if ar.get("steady_seconds_per_block"):
            result["speedup_steady"] = ar["steady_seconds_per_block"] / result["signround"]["steady_seconds_per_block"]
    if dp is not None:  # one line per rank: where it ran, its own peak and speed
        print(f"rank {dp.rank}/{dp.world} on {accel.device}: steady "
              f"{result['signround']['steady_seconds_per_block']:.3f} s/block, peak "
              f"{report.peak_memory_bytes / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    if dp is None or dp.is_main:
        print_table(result)
        print("RESULT " + json.dumps(result, default=str))
    return result


def print_table(r: dict[str, Any]) -> None:
    s, a = r["signround"], r.get("auto_round")
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    ranks = f"  data-parallel ranks {r['world_size']}" if r.get("world_size", 1) > 1 else ""
    print(f"device {r['device']} {r['gpu'] or ''}  torch {r['torch']}{ranks}")
    st = lambda x: "-" if not x else f"{x:.2f}"  # noqa: E731
    print(f"{'':14}{'s/block':>10}{'steady':>8}{'peak mem':>12}  final-block loss (all blocks)")
    print(f"{'signround':14}{s['mean_seconds_per_block']:>10.2f}{st(s.get('steady_seconds_per_block')):>8}"
          f"{gib(s['peak_memory_bytes']):>12}  "
          f"{s['block_loss'][-1]:.4g} {['%.3g' % x for x in s['block_loss']]}")
    if a is not None:
        print(f"{'auto-round':14}{a['seconds_per_block']:>10.2f}{st(a.get('steady_seconds_per_block')):>8}"
              f"{gib(a['peak_memory_bytes']):>12}  "
              f"{a['block_loss'][-1]:.4g} {['%.3g' % x for x in a['block_loss']]}")
        if r.get("speedup_steady"):
            print(f"steady-state (blocks after the first) speed-up: {r['speedup_steady']:.2f}x")
        print(f"per-block speed-up: {r['speedup_per_block']:.2f}x; final block loss ratio (ours/theirs): "
              f"{s['block_loss'][-1] / a['block_loss'][-1]:.3f}")
    else:
        print("auto-round not importable (or --no-auto-round): no comparison")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
