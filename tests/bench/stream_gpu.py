"""Issue 16's GPU measurement (not yet run: no device time was left when streaming was written).

An 8B-shaped random model (Llama-3-8B block dims, bf16 on disk in 5 GB shards) quantized twice,
in RAM and streamed from disk, each in its own process: peak CPU RSS (the child's ru_maxrss),
peak GPU memory (the report's max_memory_allocated), wall time, and the planner's estimate for
the same settings; and whether the two checkpoints are equal tensor for tensor (on a GPU not
guaranteed: attention backward kernels may reduce in a varying order). A 70B-shaped model's plan,
from a meta-device skeleton, beside the 2-block bench measurement (`signround bench --dims 70b`).

From the repo root on the device machine, one phase per call (each fits the 10-minute limit):

    python3 tests/bench/stream_gpu.py build  --dir /tmp/m8b                 # ~3-5 min: 16 GB on disk
    python3 tests/bench/stream_gpu.py ram    --dir /tmp/m8b --out $OUT      # in-RAM run, iters below
    python3 tests/bench/stream_gpu.py stream --dir /tmp/m8b --out $OUT      # streamed run
    python3 tests/bench/stream_gpu.py compare --dir /tmp/m8b --out $OUT     # tensors equal?
    python3 tests/bench/stream_gpu.py plan70b --out $OUT                    # the 70b plan (no GPU work)
    python3 -m signround bench --dims 70b --no-reference --json $OUT/bench-70b.json   # its 2-block peak

--layers (default 32) and --iters (default 50, so one run is ~32 blocks x ~3 s) trade time for
fidelity; every number goes to $OUT/stream-<phase>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DIMS_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256)
DIMS_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=4096)  # `--tiny`: a CPU dry run of every phase in seconds
DIMS_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256)


def build(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = AutoConfig.for_model("llama", num_hidden_layers=args.layers, max_position_embeddings=8192,
                               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                               **(DIMS_TINY if args.tiny else DIMS_8B))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.dir, max_shard_size="5GB")
    words = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", pad_token="w2", eos_token="w1").save_pretrained(args.dir)
    return {"seconds": time.perf_counter() - start, "layers": args.layers, "bytes": sum(
        p.stat().st_size for p in Path(args.dir).glob("*.safetensors"))}


def _quantize(args: argparse.Namespace, mode: str) -> dict:
    out = Path(args.out) / f"q-{mode}"
    report = Path(args.out) / f"report-{mode}.json"
    vocab = (DIMS_TINY if args.tiny else DIMS_8B)["vocab_size"]
    words = " ".join(f"w{(i * 7919) % (vocab - 3) + 3}" for i in range(200_000))
    data = Path(args.out) / "calib.txt"
    data.write_text(words)
    common = ["--device", args.device, "--iters", str(args.iters), "--dataset", str(data), "--overwrite",
              *(["--nsamples", "8", "--seqlen", "64", "--batch-size", "4"] if args.tiny else [])]
    extra = ["--stream-from-disk"] if mode == "stream" else []
    plan = subprocess.run([sys.executable, "-m", "signround", "quantize", args.dir, "--dry-run", *common, *extra],
                          capture_output=True, text=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "signround", "quantize", args.dir, "-o", str(out), "--report-json",
                              str(report), *common, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timeline = _rss_timeline(child)  # where the run's host memory goes (capture, each block, export)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rep = json.loads(report.read_text()) if report.is_file() else {}
    return {"mode": mode, "returncode": child.returncode, "seconds": seconds, "peak_rss_bytes": rss,
            "gpu_peak_bytes": rep.get("peak_memory_bytes"), "blocks": [b["seconds"] for b in rep.get("blocks", [])],
            "plan": [line for line in plan.stdout.splitlines() if line.startswith(("memory plan", "  "))][-40:],
            "rss_timeline": timeline, "stderr_tail": stderr[-2000:]}


def _rss_timeline(child: subprocess.Popen, every: float = 0.5) -> list[tuple[float, int, int]]:
    """(seconds since start, RSS bytes, of which anonymous) of `child` every `every` s until it ends
    (Linux /proc; empty elsewhere). The pipes are drained by a thread so the child never blocks."""
    import threading

    chunks: dict[str, list[str]] = {"out": [], "err": []}
    drains = [threading.Thread(target=lambda f=f, k=k: chunks[k].extend(f), daemon=True)
              for k, f in (("out", child.stdout), ("err", child.stderr))]
    for t in drains:
        t.start()
    status = Path(f"/proc/{child.pid}/status")
    start, out = time.perf_counter(), []
    while child.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            kib = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
            out.append((round(time.perf_counter() - start, 2), kib("VmRSS"), kib("RssAnon")))
        except (OSError, ValueError):
            break
        time.sleep(every)
    for t in drains:
        t.join()
    child.communicate = lambda: ("".join(chunks["out"]), "".join(chunks["err"]))  # type: ignore[method-assign]
    return out


def compare(args: argparse.Namespace) -> dict:
    import torch

    from signround.adapters.checkpoint.files import iter_tensors

    a = dict(iter_tensors(Path(args.out) / "q-ram"))
    b = dict(iter_tensors(Path(args.out) / "q-stream"))
    differ = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    return {"tensors": len(a), "same_keys": a.keys() == b.keys(), "differ": differ[:20], "n_differ": len(differ)}


def plan70b(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from signround.adapters.engine.planner import ModelShape, Settings, choose, estimate
    from signround.adapters.hf.blocks import select_layers
    from signround.rounding import QuantSpec, preset

    out = {}
    for layers in (80, 2):
        cfg = AutoConfig.for_model("llama", num_hidden_layers=layers, tie_word_embeddings=False, **DIMS_70B)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        plan = select_layers(model, ["model.layers"], QuantSpec(bits=4, group_size=128))
        shape = ModelShape.of(model, ["model.layers"], plan)
        est = estimate(shape, preset("default"), Settings("host", True, 8, 1), device_type="cuda")
        out[f"{layers} layers"] = {"estimate": [f"{k}: {v}" for k, v in est.device.parts.items()],
                                   "device_peak": est.device.total, "host_peak": est.host.total,
                                   "fits_24GiB": choose(shape, preset("default"), device_type="cuda",
                                                        max_device=24 * 2**30, max_host=64 * 2**30).describe()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "ram", "stream", "compare", "plan70b"])
    ap.add_argument("--dir", default="/tmp/m8b")
    ap.add_argument("--out", default="/tmp/stream-out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims and recipe: a CPU dry run of the phases")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.phase == "build":
        result = build(args)
    elif args.phase in ("ram", "stream"):
        result = _quantize(args, args.phase)
    elif args.phase == "compare":
        result = compare(args)
    else:
        result = plan70b(args)
    path = Path(args.out) / f"stream-{args.phase}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()
