"""`signround bench`: per-block tuning time, peak memory and final block loss, signround vs auto-round.

A random Qwen2-architecture decoder with the block dimensions of a real model (`--dims`, see
`DIMS`), random calibration tokens, the default recipe (200 iters, 128 × 2048, bs 8), W4 G128 sym.
When `auto_round` imports, the same model copy and data go through auto-round in the same
process, and both results are scored the same way: each quantized block's MSE to the fp block
output, on the quantized-input chain (as tuning sees it), over all calibration samples.

    signround bench --dims 2b --json bench-2b.json          # Qwen2-VL-2B text dims, vs auto-round
    signround bench --dims 8b --profile prof-8b             # + torch.profiler table, memory snapshot
    signround bench --dims 70b --reference-low-mem          # + auto-round with low_gpu_mem_usage
    signround bench --dims tiny --no-reference              # seconds on a CPU
    signround bench --dims 8b --layers 2 --iters 50         # explicit flags override the preset

What is measured, per tool: seconds per block (`seconds_per_block`), steady = the median after the
first block, first-block overhead = first − steady (compile and warm-up), the device allocator's
peak (`peak_memory_bytes`) and the same net of what was resident when the tool started
(`resident_bytes_at_start`: the fp model that scores both tools plus the tool's own model copy,
see `model_bytes` and `embedding_bytes`), and the block losses. auto-round's per-block seconds
are read off its "layers in the block" log lines (block i > 1: the gap between the lines of blocks
i − 1 and i, as the issue's table did; block 1: from the start of its per-block pipeline call,
`AlgorithmComposer.compress_block` in 0.16.x, to its line); `compress_block_seconds` holds the
pipeline calls alone. `summary` holds the per-size record of
`spec/performance.json` (`performance_record`).

`--profile DIR` (CUDA only; skipped elsewhere): after the timed run, a 1-layer copy of the model
is tuned for `profile_iters` steps under torch.profiler (DIR/ops.txt: the key_averages table by
CUDA time) while `torch.cuda.memory._record_memory_history` records (DIR/memory_snapshot.pickle,
kept under 16 MiB: open it at https://pytorch.org/memory_viz).

Data parallel (one process per GPU, each step's batch split across ranks; auto-round and the
profile are skipped):

    torchrun --nproc-per-node 2 -m signround bench --no-reference

Environment: SIGNROUND_COMPILE=0 runs the step eagerly on CUDA; SIGNROUND_COMPILE_BLOCK=0/1 and
SIGNROUND_CUDA_GRAPHS=0/1 force the block compile and the CUDA-graph step off or on (by default they
follow the block size: `adapters/engine/runtime.py`). SIGNROUND_COMMIT names the commit when `git`
cannot (a copied tree).

Prints a table and one JSON line (prefix `RESULT `) with every number.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import pickle
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from signround.adapters import as_pure, capture_inputs, find_block_lists, quantize_model, run_block
from signround.adapters.engine import distributed
from signround.adapters.engine import env as signround_env
from signround.adapters.engine import graphs
from signround.adapters.engine.device import Accelerator, peak_memory, reset_peak_memory, resolve, synchronize
from signround.adapters.engine.planner import low_memory_recipe
from signround.adapters.hf.blocks import blocks_of
from signround.rounding import QuantSpec, preset

GIB = 2**30
SNAPSHOT_LIMIT = 15 * 2**20  # the device tool brings back files of at most 16 MiB

#: Block dimensions of real models (random weights). Recipe keys, where given, override the defaults.
DIMS: dict[str, dict[str, int]] = {
    "2b": dict(layers=4, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936),  # Qwen2-VL-2B text
    "8b": dict(layers=3, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),  # Llama-3-8B
    "70b": dict(layers=2, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),  # Llama-3-70B
    "tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512,  # seconds on a CPU
                 iters=5, nsamples=8, seqlen=32, batch_size=4),
}


def _plain(_inst: Any, _field: Any, value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


@attrs.frozen(kw_only=True)
class BenchConfig:
    """One benchmark run. Build it with `BenchConfig.preset(dims, **overrides)`."""

    dims: str = "2b"
    layers: int = 4
    hidden: int = 1536
    intermediate: int = 8960
    heads: int = 12
    kv_heads: int = 2
    vocab: int = 151936
    model_type: str = "qwen2"  # any decoder config taking these names: qwen2, llama, …
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    bits: int = 4
    group_size: int = 128
    device: Optional[str] = None  # cuda, cpu, … (None: best available)
    dtype: str = attrs.field(default="bfloat16", validator=attrs.validators.in_(("bfloat16", "float16", "float32")))
    low_gpu_mem_usage: bool = False  # ours: the activation cache on the CPU, steps in sub-batches of ≤ 4096 tokens
    cache: Optional[str] = None  # ours: activation cache on auto, device or host; None: the engine's default
    reference: bool = True  # also run auto-round, when it imports
    reference_low_mem: bool = False  # also run auto-round with low_gpu_mem_usage=True
    profile: Optional[Path] = None  # write the profile and memory snapshot here (CUDA only)
    profile_iters: int = 25
    profile_max_entries: int = 100_000
    seed: int = 0

    @classmethod
    def preset(cls, dims: str = "2b", **overrides: Any) -> "BenchConfig":
        """The `dims` preset with every override that is not None applied on top."""
        if dims not in DIMS:
            raise ValueError(f"--dims {dims!r} is not a preset; choose one of {', '.join(DIMS)}")
        values: dict[str, Any] = {"dims": dims, **DIMS[dims]}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("profile") is not None:
            values["profile"] = Path(values["profile"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, value_serializer=_plain)


# ---------------------------------------------------------------------------------------------
# model, data, scoring


def build_model(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, layers: Optional[int] = None) -> Any:
    """A random decoder of the configured dimensions, built on the CPU, then moved in `dtype`."""
    hf_cfg = AutoConfig.for_model(cfg.model_type, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                  num_hidden_layers=cfg.layers if layers is None else layers,
                                  num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                                  vocab_size=cfg.vocab, max_position_embeddings=32768, rope_theta=1e6,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(hf_cfg).to(device=device, dtype=dtype).eval()


def model_bytes(model: Any) -> dict[str, int]:
    """Bytes of one model copy (parameters and buffers, shared tensors once) and of its embeddings."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    emb: set[int] = set()
    emb_bytes = 0
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(m, "weight", None)
        if w is not None and w.data_ptr() not in emb:
            emb.add(w.data_ptr())
            emb_bytes += w.numel() * w.element_size()
    return {"model_bytes": total, "embedding_bytes": emb_bytes}


def allocated(device: torch.device) -> Optional[int]:
    """Bytes the device allocator holds now (None on the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.memory_allocated(device))
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batches(cfg: BenchConfig) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(3, cfg.vocab, (cfg.nsamples, cfg.seqlen), generator=gen)
    return [ids[i:i + cfg.batch_size] for i in range(0, cfg.nsamples, cfg.batch_size)]


@torch.no_grad()
def block_losses(fp_model: Any, q_model: Any, batches: list[torch.Tensor], cfg: BenchConfig,
                 accel: Accelerator) -> list[float]:
    """MSE(B_q(X_q), B_fp(X_fp)) per block over all samples: the same score for any quantizer."""
    p = next(fp_model.parameters())
    q_model.to(device=p.device, dtype=p.dtype)  # auto-round casts to bf16 on CPU; the cast back is exact
    prefix = find_block_lists(fp_model)[0]
    cap = capture_inputs(fp_model, batches, prefix, nsamples=cfg.nsamples, store_device=accel.store_device)
    x_fp = x_q = cap.hidden
    losses = []
    for i, (b_fp, b_q) in enumerate(zip(blocks_of(fp_model, prefix), blocks_of(q_model, prefix))):
        fn_fp, w_fp = as_pure(b_fp, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
        fn_q, w_q = as_pure(b_q, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
        target, _ = run_block(fn_fp, w_fp, cap.block_inputs(i, x_fp), accel, cfg.batch_size)
        out, loss = run_block(fn_q, w_q, cap.block_inputs(i, x_q), accel, cfg.batch_size, target)
        losses.append(float(loss))
        x_fp, x_q = target, out
    return losses


def _quantize(model: Any, batches: list[torch.Tensor], spec: QuantSpec, recipe: Any, accel: Accelerator,
              dp: Any) -> Any:
    """`quantize_model` without progress output (no `on_block`)."""
    return quantize_model(model, batches, spec, recipe, device=accel, data_parallel=dp)


def _resolve(cfg: BenchConfig) -> Accelerator:
    """The Accelerator for `cfg` (cache placement: the engine's default unless `cfg.cache` is set)."""
    return resolve(cfg.device, low_gpu_mem_usage=cfg.low_gpu_mem_usage, cache=cfg.cache or "auto")


def steady(per_block: list[float]) -> float:
    """Median seconds per block after the first (the first carries compile and warm-up)."""
    rest = sorted(per_block[1:]) or per_block
    return rest[len(rest) // 2]


def _timing(per_block: list[float]) -> dict[str, Any]:
    st = steady(per_block)
    return {"seconds_per_block": per_block, "mean_seconds_per_block": sum(per_block) / len(per_block),
            "steady_seconds_per_block": st, "first_block_seconds": per_block[0],
            "first_block_overhead_seconds": per_block[0] - st if len(per_block) > 1 else None}


def _memory(peak: Optional[int], resident: Optional[int], kind: str) -> dict[str, Any]:
    return {"peak_memory_bytes": peak, "peak_memory_kind": kind, "resident_bytes_at_start": resident,
            "peak_net_bytes": None if peak is None or resident is None else peak - resident}


# ---------------------------------------------------------------------------------------------
# the two tools


def run_ours(model: Any, batches: list[torch.Tensor], cfg: BenchConfig, accel: Accelerator,
             dp: Any) -> tuple[Any, dict[str, Any]]:
    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=True)
    recipe = preset("default", iters=cfg.iters, nsamples=cfg.nsamples, seqlen=cfg.seqlen, batch_size=cfg.batch_size)
    if cfg.low_gpu_mem_usage:  # as the facade does: small sub-batches on an accelerator
        recipe = low_memory_recipe(recipe, accel.device.type)
    resident = allocated(accel.device)
    compiled_before = _compile_seconds()
    start = time.perf_counter()
    model, report = _quantize(model, batches, spec, recipe, accel, dp)
    total = time.perf_counter() - start
    compiled = {k: round(v - compiled_before.get(k, 0.0), 3) for k, v in _compile_seconds().items()
                if v - compiled_before.get(k, 0.0) > 1e-3}
    per_block = [b.seconds for b in report.blocks]
    out = {"seconds": total, "setup_seconds": total - sum(per_block), **_timing(per_block),
           **_memory(report.peak_memory_bytes, resident, report.peak_memory_kind),
           "phases_per_block": [dict(b.phases) for b in report.blocks],  # where the first block's extra goes
           "report_loss_rtn": [b.loss_rtn for b in report.blocks],
           "report_loss_tuned": [b.loss_tuned for b in report.blocks],
           "cuda_graphs_not_used": graphs.failures(),  # block layouts that fell back to eager steps
           "cuda_graphs_warmup_syncs": graphs.warmup_syncs(),  # and where a warm-up step synchronised
           "compile_seconds": compiled}  # torch.compile's own phases during our run (what the first block holds)
    return model, out


def _compile_seconds() -> dict[str, float]:
    """torch.compile's time so far in this process, per phase (dynamo's `compile_times` metrics)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - a torch without them
        return {}
    return {k: float(sum(v)) for k, v in compilation_time_metrics.items()}


def dummy_tokenizer(vocab: int) -> Any:
    """auto-round insists on a tokenizer even for tensor data; a word-level one over the id range does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t2", eos_token="t1")


def import_auto_round() -> tuple[Any, Optional[str]]:
    """(the AutoRound class, None), or (None, why not)."""
    try:
        from auto_round import AutoRound
    except ImportError as err:
        return None, f"auto-round is not importable: {err}"
    except Exception as err:  # noqa: BLE001 - a broken install must not cost the run its own numbers
        return None, f"auto-round failed to import: {type(err).__name__}: {err}"
    return AutoRound, None


class _BlockClock:
    """Wall seconds of each call of auto-round's per-block pipeline, synchronized at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.seconds: list[float] = []
        self._undo: Optional[Any] = None

    def __enter__(self) -> "_BlockClock":
        try:
            from auto_round.algorithms.composer import AlgorithmComposer
        except ImportError:  # another auto-round layout: the log stamps remain
            return self
        original = AlgorithmComposer.compress_block
        clock = self

        def timed(composer: Any, *args: Any, **kwargs: Any) -> Any:
            synchronize(clock.device)
            t0 = time.perf_counter()
            clock.starts.append(t0)
            try:
                return original(composer, *args, **kwargs)
            finally:
                synchronize(clock.device)
                clock.seconds.append(time.perf_counter() - t0)

        AlgorithmComposer.compress_block = timed

        def undo() -> None:
            AlgorithmComposer.compress_block = original

        self._undo = undo
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._undo is not None:
            self._undo()


def run_auto_round(model: Any, batches: list[torch.Tensor], cfg: BenchConfig, *,
                   low_gpu_mem_usage: bool = False) -> dict[str, Any]:
    """auto-round on `model` (changed in place); every number, plus the quantized model under "model"."""
    AutoRound, why = import_auto_round()
    if AutoRound is None:
        return {"error": why}
    logged: list[str] = []
    stamps: list[float] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            logged.append(msg)
            if "layers in the block" in msg:
                stamps.append(time.perf_counter())

    handlers = []
    for name in ("autoround", "auto_round"):
        h = Grab()
        logging.getLogger(name).addHandler(h)
        handlers.append((name, h))
    device = next(model.parameters()).device
    try:
        free_memory(device)
        resident = allocated(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        with _BlockClock(device) as clock:
            ar = AutoRound(model, tokenizer=dummy_tokenizer(cfg.vocab), bits=cfg.bits, group_size=cfg.group_size,
                           sym=True, iters=cfg.iters, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                           batch_size=cfg.batch_size, dataset=batches, seed=42, low_gpu_mem_usage=low_gpu_mem_usage)
            ar.quantize()
            synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        for name, h in handlers:
            logging.getLogger(name).removeHandler(h)
    mem, kind = peak_memory(device)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # block i+1's time = the gap between "done" lines
    out: dict[str, Any] = {"seconds": seconds, "low_gpu_mem_usage": low_gpu_mem_usage,
                           **_memory(mem, resident, kind), "log_gap_seconds": gaps,
                           "loss_log": [m for m in logged if "loss" in m][-cfg.layers:]}
    out["compress_block_seconds"] = clock.seconds
    if len(clock.starts) == cfg.layers and len(stamps) == cfg.layers:
        # block 1: from its pipeline call to its "done" line; block i > 1: from the previous "done"
        # line to its own (the whole loop iteration, auto-round's housekeeping between blocks included)
        per_block = [stamps[0] - clock.starts[0], *gaps]
        out.update(timing_source="compress_block start, then 'layers in the block' log gaps",
                   setup_seconds=clock.starts[0] - start, **_timing(per_block))
    elif len(clock.seconds) == cfg.layers:
        out.update(timing_source="AlgorithmComposer.compress_block", setup_seconds=clock.starts[0] - start,
                   **_timing(clock.seconds))
    else:  # another auto-round layout: no first-block time, steady = the median gap
        out.update(timing_source="log gaps (blocks 2..n)", seconds_per_block=gaps, first_block_seconds=None,
                   first_block_overhead_seconds=None, mean_seconds_per_block=seconds / cfg.layers,
                   steady_seconds_per_block=sorted(gaps)[len(gaps) // 2] if gaps else None)
    out["model"] = ar.model
    return out


def _reference(fp_model: Any, batches: list[torch.Tensor], cfg: BenchConfig, accel: Accelerator,
               low_gpu_mem_usage: bool) -> dict[str, Any]:
    """One auto-round run on a copy of `fp_model`, scored; errors are recorded, not raised."""
    try:
        ar = run_auto_round(copy.deepcopy(fp_model), batches, cfg, low_gpu_mem_usage=low_gpu_mem_usage)
        if "model" in ar:
            ar["block_loss"] = block_losses(fp_model, ar.pop("model"), batches, cfg, accel)
    except Exception as err:  # noqa: BLE001 - keep our own numbers when the reference breaks
        traceback.print_exc()
        ar = {"error": f"{type(err).__name__}: {err}"}
    free_memory(accel.device)
    return ar


# ---------------------------------------------------------------------------------------------
# profile


_GEMM = re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|cublas|matmul|triton_tem|_mm_|bmm", re.IGNORECASE)


def _kernel_times(prof: Any) -> dict[str, float]:
    """Device microseconds per kernel name (events that ran on the GPU)."""
    times: dict[str, float] = {}
    cuda = torch.autograd.DeviceType.CUDA
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != cuda:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        times[e.key] = times.get(e.key, 0.0) + float(us)
    return times


def _table(prof: Any, sort_by: str, fallback: str) -> str:
    try:
        return prof.key_averages().table(sort_by=sort_by, row_limit=40)
    except (KeyError, AttributeError, ValueError):
        return prof.key_averages().table(sort_by=fallback, row_limit=40)


def _write_snapshot(snapshot: dict[str, Any], path: Path, limit: int = SNAPSHOT_LIMIT) -> dict[str, Any]:
    """Pickle the allocator snapshot to `path` under `limit` bytes: first the stack frames of the
    oldest trace events go (the timeline, peak included, stays whole), then the oldest events."""
    traces = [list(t) for t in snapshot.get("device_traces", [])]
    n = [len(t) for t in traces]

    def build(with_frames: float, kept: float) -> dict[str, Any]:
        out = []
        for t in traces:
            t = t[len(t) - int(len(t) * kept):] if kept < 1 else t
            cut = len(t) - int(len(t) * with_frames)
            out.append([{**e, "frames": []} if i < cut and e.get("frames") else e for i, e in enumerate(t)])
        return {**snapshot, "device_traces": out}

    frames, kept, stripped_segments = 1.0, 1.0, False
    snap = snapshot
    blob = pickle.dumps(snap)
    while len(blob) > limit:
        if frames > 1e-3:
            frames = 0.0 if frames < 2e-3 else frames * min(0.5, 0.9 * limit / len(blob))
        elif kept > 1e-3:
            kept *= min(0.5, 0.9 * limit / len(blob))
        elif not stripped_segments:
            stripped_segments = True
            snapshot = {**snapshot, "segments": [{**seg, "blocks": [{**b, "frames": []} for b in seg.get("blocks", [])]}
                                                 for seg in snapshot.get("segments", [])]}
        else:
            break
        snap = build(frames, kept)
        blob = pickle.dumps(snap)
    path.write_bytes(blob)
    kept_n = [len(t) for t in snap.get("device_traces", [])]
    with_frames = sum(1 for t in snap.get("device_traces", []) for e in t if e.get("frames"))
    return {"path": str(path), "bytes": len(blob), "trace_events": sum(n), "trace_events_kept": sum(kept_n),
            "trace_events_with_frames": with_frames, "segments": len(snap.get("segments", [])),
            "segment_frames_stripped": stripped_segments}


def profile_block(cfg: BenchConfig, accel: Accelerator, batches: list[torch.Tensor], out_dir: Path,
                  dtype: torch.dtype, *, force: bool = False) -> dict[str, Any]:
    """Tune one block of a fresh 1-layer copy for `cfg.profile_iters` steps under torch.profiler,
    recording the CUDA allocator's history; write DIR/ops.txt and DIR/memory_snapshot.pickle.
    Only on CUDA (`force` runs the CPU-side profile elsewhere, for tests)."""
    cuda = accel.device.type == "cuda"
    if not cuda and not force:
        print(f"profile skipped: needs CUDA (device {accel.device})", file=sys.stderr)
        return {"skipped": f"needs CUDA, device is {accel.device}"}
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, accel.device, dtype, layers=1)
    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size, sym=True)
    recipe = preset("default", iters=cfg.profile_iters, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                    batch_size=cfg.batch_size)
    info: dict[str, Any] = {"iters": cfg.profile_iters, "layers": 1}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                  max_entries=cfg.profile_max_entries)
    try:
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            _, report = _quantize(model, batches, spec, recipe, accel, None)
        info["seconds"] = time.perf_counter() - start
        info["block_seconds"] = report.blocks[0].seconds
        info["peak_memory_bytes"] = report.peak_memory_bytes
        if cuda:
            info["snapshot"] = _write_snapshot(torch.cuda.memory._snapshot(), out_dir / "memory_snapshot.pickle")
    finally:
        if cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
    tables = ["# by cuda_time_total", _table(prof, "cuda_time_total", "device_time_total"),
              "# by self_cuda_time_total", _table(prof, "self_cuda_time_total", "self_device_time_total")]
    (out_dir / "ops.txt").write_text("\n".join(tables) + "\n", encoding="utf-8")
    kernels = _kernel_times(prof)
    total = sum(kernels.values())
    gemm = sum(us for name, us in kernels.items() if _GEMM.search(name))
    info.update(ops_table=str(out_dir / "ops.txt"), kernel_us_total=total, gemm_us=gemm,
                gemm_share=gemm / total if total else None,
                top_kernels=sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    del model
    free_memory(accel.device)
    return info


# ---------------------------------------------------------------------------------------------
# records


def commit() -> Optional[str]:
    """$SIGNROUND_COMMIT when set (a copied tree's .git may be stale: seen on the lent GPU, where it
    named the session's first commit), else the checkout's HEAD, else None."""
    named = signround_env.read().commit
    if named:
        return named
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def performance_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """The per-size record of `spec/performance.json` from one bench result (its `summary`)."""
    s, a = result["signround"], result.get("auto_round") or {}
    gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
    ours_loss = (s.get("block_loss") or [None])[-1]
    ref_loss = (a.get("block_loss") or [None])[-1]
    return {"ours_steady_s": s.get("steady_seconds_per_block"), "ref_steady_s": a.get("steady_seconds_per_block"),
            "ours_peak_gib": gib(s.get("peak_memory_bytes")), "ref_peak_gib": gib(a.get("peak_memory_bytes")),
            "loss_ratio": ours_loss / ref_loss if ours_loss is not None and ref_loss else None,
            "gpu": result.get("gpu"), "commit": result.get("commit")}


def merge_performance(path: Path, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Write `records` (size → performance_record) into the JSON file at `path`, keeping other sizes."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.update({k: dict(v) for k, v in records.items()})
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return data


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    for name in ("transformers", "auto-round", "signround"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_json(result: Mapping[str, Any], path: Optional[Path]) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(result, default=str, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the run


def run_bench(cfg: BenchConfig, json_out: Optional[Path] = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring), print the table and return every number;
    `json_out`: also write them there (before the profile, and again with it)."""
    dp = distributed.from_env()
    if dp is not None:  # auto-round has no data-parallel block tuning to compare with
        cfg = attrs.evolve(cfg, reference=False, reference_low_mem=False, profile=None,
                           device=cfg.device or dp.device())
    main = dp is None or dp.is_main
    accel = _resolve(cfg)
    dtype = getattr(torch, cfg.dtype) if accel.is_accelerator else torch.float32
    t0 = time.perf_counter()
    fp_model = build_model(cfg, accel.device, dtype)
    build_seconds = time.perf_counter() - t0
    batches = make_batches(cfg)
    result: dict[str, Any] = {
        "dims": cfg.dims, "device": str(accel.device), "cache_device": str(accel.store_device),
        "gpu": torch.cuda.get_device_name(accel.device) if accel.device.type == "cuda" else None,
        "gpu_memory_bytes": (torch.cuda.get_device_properties(accel.device).total_memory
                             if accel.device.type == "cuda" else None),
        "torch": torch.__version__, "versions": _versions(), "commit": commit(), "config": cfg.to_dict(),
        "env": attrs.asdict(signround_env.read(), value_serializer=_plain),
        "world_size": 1 if dp is None else dp.world, "build_seconds": build_seconds,
        **model_bytes(fp_model), "model_dtype": str(dtype),
    }

    ours, result["signround"] = run_ours(copy.deepcopy(fp_model), batches, cfg, accel, dp)
    result["signround"]["block_loss"] = block_losses(fp_model, ours, batches, cfg, accel)
    del ours
    free_memory(accel.device)

    if cfg.reference:
        result["auto_round"] = _reference(fp_model, batches, cfg, accel, low_gpu_mem_usage=False)
    if cfg.reference_low_mem:
        result["auto_round_low_mem"] = _reference(fp_model, batches, cfg, accel, low_gpu_mem_usage=True)
    _ratios(result)
    del fp_model
    free_memory(accel.device)
    result["summary"] = performance_record(result)

    if dp is not None:  # one line per rank: where it ran, its own peak and speed
        s = result["signround"]
        print(f"rank {dp.rank}/{dp.world} on {accel.device}: steady {s['steady_seconds_per_block']:.3f} s/block, "
              f"peak {s['peak_memory_bytes'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    if main:
        print_table(result)
        _write_json(result, json_out)
    if cfg.profile is not None and main:
        try:
            result["profile"] = profile_block(cfg, accel, batches, cfg.profile, dtype)
        except Exception as err:  # noqa: BLE001 - the timed numbers are already written
            traceback.print_exc()
            result["profile"] = {"error": f"{type(err).__name__}: {err}"}
        print_profile(result["profile"])
        _write_json(result, json_out)
    if main:
        print("RESULT " + json.dumps(result, default=str), flush=True)
    return result


def _ratios(result: dict[str, Any]) -> None:
    s = result["signround"]
    for key, tag in (("auto_round", ""), ("auto_round_low_mem", "_low_mem")):
        a = result.get(key)
        if not a or "error" in a:
            continue
        if a.get("mean_seconds_per_block"):
            result["speedup_per_block" + tag] = a["mean_seconds_per_block"] / s["mean_seconds_per_block"]
        if a.get("steady_seconds_per_block"):
            result["speedup_steady" + tag] = a["steady_seconds_per_block"] / s["steady_seconds_per_block"]
        if a.get("peak_memory_bytes") and s.get("peak_memory_bytes"):
            result["peak_ratio" + tag] = s["peak_memory_bytes"] / a["peak_memory_bytes"]
        if a.get("peak_net_bytes") and s.get("peak_net_bytes") is not None:
            result["peak_net_ratio" + tag] = s["peak_net_bytes"] / a["peak_net_bytes"]
        if a.get("block_loss") and s.get("block_loss") and a["block_loss"][-1]:
            result["loss_ratio" + tag] = s["block_loss"][-1] / a["block_loss"][-1]


def print_table(r: Mapping[str, Any]) -> None:
    gib = lambda b: "-" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    num = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    ranks = f"  data-parallel ranks {r['world_size']}" if r.get("world_size", 1) > 1 else ""
    c = r["config"]
    print(f"dims {r['dims']} ({c['layers']}×{c['hidden']}/{c['intermediate']}, {c['heads']}/{c['kv_heads']} heads, "
          f"vocab {c['vocab']}; {c['iters']} iters, {c['nsamples']}×{c['seqlen']}, bs {c['batch_size']}, "
          f"W{c['bits']} G{c['group_size']})  device {r['device']} {r['gpu'] or ''}  torch {r['torch']}{ranks}")
    print(f"ours: activation cache on {r.get('cache_device')}")
    print(f"one model copy {gib(r['model_bytes'])} GiB (embeddings {gib(r['embedding_bytes'])} GiB); "
          f"resident at start = the fp model + the tool's copy")
    print(f"{'':22}{'s/block':>8}{'steady':>8}{'first':>8}{'+first':>8}{'peak GiB':>10}{'net GiB':>9}"
          f"  final-block loss (all blocks)")
    for key, label in (("signround", "signround"), ("auto_round", "auto-round"),
                       ("auto_round_low_mem", "auto-round low_mem")):
        t = r.get(key)
        if t is None:
            continue
        if "error" in t:
            print(f"{label:22}not run: {t['error']}")
            continue
        loss = t.get("block_loss") or [float("nan")]
        print(f"{label:22}{num(t.get('mean_seconds_per_block')):>8}{num(t.get('steady_seconds_per_block')):>8}"
              f"{num(t.get('first_block_seconds')):>8}{num(t.get('first_block_overhead_seconds')):>8}"
              f"{gib(t.get('peak_memory_bytes')):>10}{gib(t.get('peak_net_bytes')):>9}"
              f"  {loss[-1]:.4g} {['%.3g' % x for x in loss]}")
    phases = (r.get("signround") or {}).get("phases_per_block") or []
    if len(phases) > 1 and phases[0]:
        first, second = phases[0], phases[1]
        print("ours, phases of the first / second block (s): " + ", ".join(
            f"{k} {first[k]:.2f}/{second.get(k, float('nan')):.2f}" for k in first))
    if "auto_round" not in r:
        print("auto-round not run (--no-reference)")
    for tag, label in (("", "auto-round"), ("_low_mem", "auto-round low_mem")):
        if f"speedup_steady{tag}" in r or f"loss_ratio{tag}" in r:
            print(f"vs {label}: steady speed-up {num(r.get('speedup_steady' + tag))}x, per-block "
                  f"{num(r.get('speedup_per_block' + tag))}x; peak ours/theirs {num(r.get('peak_ratio' + tag))} "
                  f"(net {num(r.get('peak_net_ratio' + tag))}); final block loss ratio ours/theirs "
                  f"{'-' if r.get('loss_ratio' + tag) is None else '%.3f' % r['loss_ratio' + tag]}")


def print_profile(p: Mapping[str, Any]) -> None:
    if "skipped" in p or "error" in p:
        print(f"profile: {p.get('skipped') or p.get('error')}")
        return
    share = p.get("gemm_share")
    print(f"profile: 1 block, {p['iters']} iters, {p['seconds']:.1f} s, peak "
          f"{(p.get('peak_memory_bytes') or 0) / GIB:.2f} GiB; GEMM share of kernel time "
          f"{'-' if share is None else f'{share:.0%}'}; table {p['ops_table']}", end="")
    snap = p.get("snapshot")
    print(f"; snapshot {snap['path']} ({snap['bytes'] / 2**20:.1f} MiB)" if snap else "")


def main(argv: Optional[list[str]] = None) -> Any:
    """`python -m signround.adapters.frontends.bench …` = `signround bench …`."""
    from signround.cli import app

    return app(["bench", *(sys.argv[1:] if argv is None else argv)], prog_name="signround")


if __name__ == "__main__":  # pragma: no cover
    main()
