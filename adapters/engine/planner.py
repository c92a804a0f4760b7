"""The memory planner: peak accelerator memory and CPU RAM of a run, before any work, and the
settings that fit a budget.

    shape = ModelShape.of(model, prefixes, plan)            # a meta-device skeleton is enough
    est = estimate(shape, recipe, Settings("host", False, 8, 1), device_type="cuda")
    plan = choose(shape, recipe, device_type="cuda", max_device=24 * GiB, max_host=64 * GiB)
    print("\\n".join(plan.describe()))

Every term is written in `spec/performance.md` ("Memory planner"), with the measurements it was
checked against. The estimate is of what `torch.cuda.max_memory_allocated` and the process's peak
RSS measure; a budget is compared with it plus a reserve (`DEVICE_RESERVE`, `HOST_MARGIN`) for
what those do not see (the CUDA context, the caching allocator's slack, allocator rounding).

`choose` tries, in this order, the settings that cost the least time: the batch as the recipe has
it, then cut into gradient-accumulation sub-batches (the same samples per step, so the same
maths); the model in RAM, then streamed from its checkpoint one block at a time; the activation
cache where the engine puts it by default, then on the other memory, then in a memory-mapped file.
The first that fits both budgets is the plan; when none does, the error names the smallest need.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import attrs
import torch
from torch import nn

from signround.adapters.checkpoint.formats import DEFAULT_FORMAT
from signround.adapters.checkpoint.inspect import layer_tensors, stored_bits
from signround.rounding import Recipe

GiB = 2**30
#: what a budget must hold beyond the estimated allocator peak on an accelerator: 10 % (allocator
#: rounding and fragmentation) plus 512 MiB (the CUDA context, cuBLAS/cuDNN workspaces)
DEVICE_RESERVE = (0.10, 512 * 2**20)
#: beyond the estimated peak RSS of the process: 20 % (malloc arenas and retention, Python objects; a
#: streamed CPU run peaked 15 % above the estimate, spec/performance.md)
HOST_MARGIN = 0.20
#: backward transient of the largest layer's qdq, bytes per weight: fused compiled halves (bf16
#: weight gradient, fp32 gradient of v, uint8 codes) vs eager (its fp32 intermediates), measured on
#: the CPU with torch.profiler (spec/performance.md)
LAYER_TRANSIENT = {"compiled": 7, "eager": 44}
#: activation gradients alive at the backward's peak, in units of [tokens, intermediate] tensors
BACKWARD_TENSORS = 2
#: the export of a model held in RAM, bytes per weight of its largest layer: `recover_codes` (fp32
#: quotients, int32 codes, the dequantized check) then `QuantLinear.from_quantized` (transposed
#: codes, int64 words), one layer at a time; 19.8 measured at 4096 × 4096 and 14336 × 4096
EXPORT_TRANSIENT = 20
#: where the activation cache may be placed (`engine/device.py` CACHE_PLACES, less "auto")
PLACES = ("device", "host", "disk")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | None) -> int | str | None:
    """A memory budget: bytes as an int, "24GiB", "24GB", "1.5TiB", "512MiB", or "auto" (returned as
    is: what the machine has). None stays None (no budget)."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text <= 0:
            raise ValueError(f"a memory budget must be positive, got {text}")
        return text
    s = str(text).strip().lower()
    if s == "auto":
        return "auto"
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read the memory budget {text!r}; write it like 24GiB, 80GB, 512MiB or auto")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return value


def current_rss() -> int:
    """This process's resident memory now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


UNREAD = "model weights not yet read from the memory-mapped checkpoint"


def unread_mapped_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the file mappings holding these CPU tensors that are not resident yet (Linux; 0 elsewhere).

    A model loaded from safetensors holds views of the memory-mapped checkpoint: its pages count in the
    RSS only once read, and every quantized weight is written (so becomes private memory) by the end
    of a run. The RSS before the run misses what is unread; this is that part (`/proc/self/smaps`:
    size less Rss of each file mapping a tensor points into)."""
    ptrs = sorted({t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu" and t.numel()})
    if not ptrs:
        return 0
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    maps: list[tuple[int, int, int]] = []  # (start, end, resident bytes) of file-backed mappings
    start = end = 0
    named = False
    for line in text.splitlines():
        head = line.split(None, 6)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = head[0].split("-")
            start, end = int(lo, 16), int(hi, 16)
            named = len(head) >= 6 and head[4] != "0" and head[5].startswith("/")
        elif named and line.startswith("Rss:"):
            maps.append((start, end, int(line.split()[1]) * 1024))
    unread = 0
    for lo, hi, rss in maps:
        if any(lo <= ptr < hi for ptr in ptrs):
            unread += max(hi - lo - rss, 0)
    return unread


def machine_budgets(device: torch.device) -> tuple[Optional[int], int]:
    """(`auto` for the accelerator: its free memory now, `auto` for the host: the RAM available now
    plus what this process already holds)."""
    import psutil

    host = int(psutil.virtual_memory().available) + current_rss()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    if device.type == "xpu":
        props = torch.xpu.get_device_properties(device)
        return int(props.total_memory) - int(torch.xpu.memory_allocated(device)), host
    return None, host


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------ the model


def _numel_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@attrs.frozen
class ModelShape:
    """What the planner reads from a model (a meta-device skeleton is enough) and its config.

    hidden/intermediate/q_dim (heads × head_dim)/kv_dim (kv heads × head_dim): the activation widths
    of a block. blocks: blocks tuned. block_bytes: the largest block's tensors; quantized: weights
    it quantizes; largest_layer: weights of its largest quantized layer; groups: its quantization
    groups. outside_bytes: every tensor outside the block lists (embeddings, final norm, lm_head;
    tied tensors once); model_bytes: the whole model. weight_size: bytes per block weight.
    packed_bytes: every quantized layer of the blocks as the export stores it in the default format
    (`inspect.layer_tensors`, the format's own table), which an in-RAM export holds beside the model."""

    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    blocks: int
    block_bytes: int
    quantized: int
    largest_layer: int
    groups: int
    outside_bytes: int
    model_bytes: int
    weight_size: int
    packed_bytes: int = 0

    @classmethod
    def of(cls, model: nn.Module, prefixes: Iterable[str], plan: Any) -> "ModelShape":
        """From `model` (weights may be on the meta device), its block-list `prefixes` and the
        LayerPlan (`hf.blocks.select_layers`) saying which layers are quantized with which spec."""
        from signround.adapters.hf.blocks import blocks_of

        prefixes = list(prefixes)
        config = getattr(model, "config", None)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        hidden = int(getattr(text, "hidden_size"))
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        inside = tuple(p + "." for p in prefixes)
        all_tensors = [*model.parameters(), *model.buffers()]
        outside = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(inside)]
        best: tuple[int, int, int, int, int] = (0, 0, 0, 0, 2)
        count = 0
        packed = 0
        for prefix in prefixes:
            for j, block in enumerate(blocks_of(model, prefix)):
                count += 1
                name = f"{prefix}.{j}."
                layers = {k: s for k, s in plan.quantize.items() if k.startswith(name)}
                modules = dict(block.named_modules())
                sizes, groups = [], 0
                for k, spec in layers.items():
                    w = modules[k[len(name):]].weight
                    sizes.append(w.numel())
                    groups += w.shape[0] * spec.num_groups(w.shape[1])
                    packed += stored_bits(layer_tensors(DEFAULT_FORMAT, spec, w.shape[1], w.shape[0]).values()) // 8
                nbytes = _numel_bytes([*block.parameters(), *block.buffers()])
                wsize = next((p.element_size() for p in block.parameters() if p.is_floating_point()), 2)
                cand = (nbytes, sum(sizes), max(sizes, default=0), groups, wsize)
                best = max(best, cand)
        return cls(hidden=hidden, intermediate=int(inter), q_dim=heads * head_dim, kv_dim=kv_heads * head_dim,
                   blocks=count, block_bytes=best[0], quantized=best[1], largest_layer=best[2], groups=best[3],
                   outside_bytes=_numel_bytes(outside), model_bytes=_numel_bytes(all_tensors), weight_size=best[4],
                   packed_bytes=packed)


# ------------------------------------------------------------------------------ the estimate


@attrs.frozen
class Settings:
    """What a plan may change: where the activation cache lives (device, host RAM, a memory-mapped
    file on disk), whether blocks stream from the checkpoint, and how a step's samples are cut."""

    cache: str
    stream: bool
    batch_size: int
    gradient_accumulate_steps: int

    def __attrs_post_init__(self) -> None:
        if self.cache not in PLACES:
            raise ValueError(f"cache placement must be one of {PLACES}, got {self.cache!r}")


@attrs.frozen
class Peak:
    """The largest of a memory's phases (capture, tune, after): its name and its parts in bytes."""

    phase: str
    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


def _max_phase(phases: Mapping[str, Mapping[str, float]]) -> Peak:
    name = max(phases, key=lambda k: sum(phases[k].values()))
    return Peak(name, {k: int(v) for k, v in phases[name].items() if v})


@attrs.frozen
class Estimate:
    """device: the accelerator's peak (None when tuning on the CPU); host: the process's peak RSS."""

    settings: Settings
    device: Optional[Peak]
    host: Peak

    def need(self) -> tuple[Optional[int], int]:
        """(device bytes a budget must hold, host bytes a budget must hold), reserves included."""
        dev = None if self.device is None else int(self.device.total * (1 + DEVICE_RESERVE[0]) + DEVICE_RESERVE[1])
        return dev, int(self.host.total * (1 + HOST_MARGIN))


#: low_gpu_mem_usage on an accelerator: a step's samples go through the block in sub-batches of at most
#: this many tokens (2 samples of 2048). The saved activations of one sub-batch are the tuning peak's
#: largest part (spec/performance.md, "low_gpu_mem_usage")
LOW_MEM_STEP_TOKENS = 4096


def low_memory_recipe(recipe: Recipe, device_type: str, max_tokens: int = LOW_MEM_STEP_TOKENS) -> Recipe:
    """`recipe` with each step cut into gradient-accumulation sub-batches of at most `max_tokens`
    tokens (the largest divisor of batch_size that fits, at least one sample): the same samples
    per step, so the same maths, summed in another order. Unchanged on the CPU, where the
    accelerator's memory is not the limit."""
    if device_type == "cpu":
        return recipe
    b = recipe.batch_size
    sub = max((k for k in _splits(b) if k * recipe.seqlen <= max_tokens), default=1)
    if sub == b:
        return recipe
    return attrs.evolve(recipe, batch_size=sub, gradient_accumulate_steps=recipe.gradient_accumulate_steps * (b // sub))


def step_tokens(recipe: Recipe, batch_size: int) -> int:
    return batch_size * recipe.seqlen


def estimate(shape: ModelShape, recipe: Recipe, settings: Settings, *, device_type: str, amp: Optional[bool] = None,
             compiled: Optional[bool] = None, baseline: int = 0, model_in_baseline: bool = False,
             unread: int = 0) -> Estimate:
    """Peak memory of a run of `recipe` on `shape` with `settings` (formulas: spec/performance.md).

    device_type: "cuda", "xpu", "hpu" or "cpu". amp: bf16 autocast on an accelerator (default
    recipe.amp). compiled: the qdq halves compiled (default: on CUDA, as runtime.policy decides).
    baseline: the process's RSS before the run (interpreter, libraries); model_in_baseline: the
    model is already loaded and counted there (a facade given a model object); unread: the bytes of it
    not yet read from a memory-mapped checkpoint (`unread_mapped_bytes`), which the run will read."""
    s = shape
    accel = device_type != "cpu"
    amp = recipe.amp if amp is None else amp
    compiled = (device_type == "cuda") if compiled is None else compiled
    w = s.weight_size
    e = 2 if (accel and amp) else w            # activations in the block
    c = 2 if (accel and amp) else w            # the activation cache
    b, g, L, N = settings.batch_size, settings.gradient_accumulate_steps, recipe.seqlen, recipe.nsamples
    h, i, qd, kd, n = s.hidden, s.intermediate, s.q_dim, s.kv_dim, s.quantized
    one_set = N * L * h * c
    sets = (2 if recipe.enable_quanted_input else 3) * one_set
    T = b * L
    saved = (e * (2 * h + 2 * qd + 2 * kd + 4 * i) + 8 * h) * T
    backward = max(BACKWARD_TENSORS * e * i * T, LAYER_TRANSIENT["compiled" if compiled else "eager"] * s.largest_layer)
    prefetched = accel and device_type == "cuda" and settings.cache != "device"
    rows = (b * g) * L * h * c * 2 * (2 if prefetched else 1)
    cache_here = settings.cache == "device" or (not accel and settings.cache == "host")
    tuning = recipe.iters > 0 and n > 0
    work: dict[str, dict[str, float]] = {
        "capture": {"hidden states of the calibration batches": N * L * h * w,
                    "activation cache": one_set if cache_here else 0},
        "tune": {"activation cache": sets if cache_here else 0,
                 "tunables (v fp32, best codes, per-group ranges)": (5 * n + 24 * s.groups) if tuning else 0,
                 "quantized weights of the step": e * n if tuning else w * n,
                 "saved activations": saved if tuning else 0,
                 "backward transient": backward if tuning else 0,
                 "step rows (inputs, targets)": rows if tuning else 0,
                 "scoring pass": 0 if tuning else (e * (2 * h + 3 * i)) * T},
        "after tuning": {"activation cache": sets if cache_here else 0,
                         "tuned v, int32 codes, dequantized weights": (8 + w) * n + 8 * s.largest_layer},
    }
    model_in_ram = 0 if model_in_baseline else s.model_bytes
    if settings.stream:  # the outside modules, the block being worked on, the next one's read / packed output
        held = s.outside_bytes + 2 * s.block_bytes
    else:
        held = model_in_ram
    # save_quantized of a model held in RAM: every packed layer beside the model, and one layer's
    # recovery and packing temporaries; the activation cache is freed by then (on CUDA the facade
    # empties the pinned blocks torch's host allocator would keep). A streamed run writes each block
    # as it finishes (its share is the 2B above).
    export = {} if settings.stream or n == 0 else {
        "packed layers of the export": s.packed_bytes,
        "export transient (one layer's codes and packing)": EXPORT_TRANSIENT * s.largest_layer}
    if accel:
        resident = {"non-block modules": s.outside_bytes, "the block": s.block_bytes}
        device = _max_phase({k: {**resident, **v} for k, v in work.items()})
        host_cache = 0 if settings.cache in ("device", "disk") else sets
        held_host = {"process before the run": baseline, UNREAD: unread,
                     "model weights" + (" (streamed)" if settings.stream else ""): held}
        host = _max_phase({"run": {**held_host, "activation cache": host_cache},
                           **({"export": {**held_host, **export}} if export else {})})
        return Estimate(settings, device, host)
    # on the CPU the "device" is the RAM: the block being tuned is part of the model already held
    base = {"process before the run": baseline, UNREAD: unread,
            "model weights" + (" (streamed)" if settings.stream else ""): held}
    if export:
        work["export"] = export
    return Estimate(settings, None, _max_phase({k: {**base, **v} for k, v in work.items()}))


# ------------------------------------------------------------------------------ the plan


@attrs.frozen
class MemoryPlan:
    """The settings chosen, their estimate, the budgets (None = none given) and what was changed."""

    estimate: Estimate
    max_device: Optional[int]
    max_host: Optional[int]
    notes: tuple[str, ...] = ()

    @property
    def settings(self) -> Settings:
        return self.estimate.settings

    def describe(self) -> list[str]:
        """Lines for `--dry-run` and the log: settings, each peak with its parts, the budgets."""
        st, est = self.settings, self.estimate
        dev_need, host_need = est.need()
        lines = [f"memory plan: cache on {st.cache}, model {'streamed from disk' if st.stream else 'in RAM'}, "
                 f"batch_size {st.batch_size} × gradient_accumulate_steps {st.gradient_accumulate_steps}"]
        for label, peak, need, budget in (("accelerator", est.device, dev_need, self.max_device),
                                          ("CPU RAM", est.host, host_need, self.max_host)):
            if peak is None:
                continue
            lines.append(f"  {label} peak ≈ {fmt_bytes(peak.total)} ({peak.phase}); with reserve "
                         f"{fmt_bytes(need)}; budget {fmt_bytes(budget) if budget else 'none'}")
            lines.extend(f"    {fmt_bytes(v):>11}  {k}" for k, v in peak.parts.items())
        lines.extend(f"  note: {n}" for n in self.notes)
        return lines


def _fits(est: Estimate, max_device: Optional[int], max_host: Optional[int]) -> bool:
    dev, host = est.need()
    return (max_device is None or dev is None or dev <= max_device) and (max_host is None or host <= max_host)


def _splits(batch_size: int) -> list[int]:
    return [k for k in range(1, batch_size + 1) if batch_size % k == 0]


def cache_order(device_type: str, cache: str = "auto") -> list[str]:
    """The placements to try, the engine's default first."""
    if cache != "auto":
        return ["host" if (device_type == "cpu" and cache == "device") else cache]
    if device_type == "cpu":
        return ["host", "disk"]
    return ["host", "device", "disk"] if device_type == "cuda" else ["device", "host", "disk"]


def choose(shape: ModelShape, recipe: Recipe, *, device_type: str, max_device: Optional[int] = None,
           max_host: Optional[int] = None, cache: str = "auto", stream: Optional[bool] = None,
           can_stream: bool = True, amp: Optional[bool] = None, compiled: Optional[bool] = None,
           baseline: int = 0, model_in_baseline: bool = False, unread: int = 0) -> MemoryPlan:
    """The first settings (in the order of the module docstring) whose estimate fits both budgets.

    cache: "auto" (the planner may place it) or a placement the user asked for (kept). stream:
    None (the planner may stream when `can_stream`), True (asked for) or False. Raises MemoryError
    naming what the smallest settings need when nothing fits."""
    caches = cache_order(device_type, cache)
    streams = [True] if stream else ([False, True] if (stream is None and can_stream) else [False])
    b, g = recipe.batch_size, recipe.gradient_accumulate_steps
    kw = dict(device_type=device_type, amp=amp, compiled=compiled, baseline=baseline,
              model_in_baseline=model_in_baseline, unread=unread)
    tried = []
    for k in _splits(b):
        for st in streams:
            for place in caches:
                est = estimate(shape, recipe, Settings(place, st, b // k, g * k), **kw)
                tried.append(est)
                if _fits(est, max_device, max_host):
                    return MemoryPlan(est, max_device, max_host, tuple(_notes(est.settings, recipe, cache, stream)))
    raise MemoryError(_refusal(shape, tried, max_device, max_host, can_stream, stream))


def _notes(st: Settings, recipe: Recipe, cache: str, stream: Optional[bool]) -> list[str]:
    notes = []
    if st.batch_size != recipe.batch_size:
        notes.append(f"batch_size {recipe.batch_size} → {st.batch_size} with gradient_accumulate_steps "
                     f"{recipe.gradient_accumulate_steps} → {st.gradient_accumulate_steps}: the same "
                     f"{st.batch_size * st.gradient_accumulate_steps} samples per step (same maths; sums "
                     "in another order, so not bit-identical)")
    if st.stream and not stream:
        notes.append("the model does not fit in RAM: blocks stream from the checkpoint one at a time")
    if cache == "auto" and st.cache == "disk":
        notes.append("the activation cache goes to a memory-mapped file (slower steps)")
    return notes


def _refusal(shape: ModelShape, tried: list[Estimate], max_device: Optional[int], max_host: Optional[int],
             can_stream: bool, stream: Optional[bool]) -> str:
    least_dev = min((e for e in tried if e.device is not None), key=lambda e: e.need()[0], default=None)
    least_host = min(tried, key=lambda e: e.need()[1])
    parts = []
    if least_dev is not None and max_device is not None and least_dev.need()[0] > max_device:
        fixed = shape.outside_bytes + shape.block_bytes
        if fixed * (1 + DEVICE_RESERVE[0]) + DEVICE_RESERVE[1] > max_device:
            parts.append(f"the non-block modules ({fmt_bytes(shape.outside_bytes)}: embeddings, final norm, lm_head) "
                         f"and one block ({fmt_bytes(shape.block_bytes)}) alone need more than the accelerator "
                         f"budget of {fmt_bytes(max_device)}")
        else:
            st, peak = least_dev.settings, least_dev.device
            assert peak is not None
            top = max(peak.parts, key=peak.parts.get)  # type: ignore[arg-type]
            hint = ("; fewer or shorter samples (nsamples, seqlen) need less" if peak.phase in ("tune", "capture")
                    else "")
            parts.append(f"the accelerator needs at least {fmt_bytes(least_dev.need()[0])} (batch_size {st.batch_size}, "
                         f"cache on {st.cache}; the peak is {peak.phase!r}, its largest part {top} "
                         f"{fmt_bytes(peak.parts[top])}), more than its budget of {fmt_bytes(max_device)}{hint}")
    if max_host is not None and least_host.need()[1] > max_host:
        st = least_host.settings
        what = "streaming blocks from disk and the cache on disk" if st.stream else "the cache on disk"
        extra = ""
        if not can_stream and stream is not False:
            extra = "; streaming from disk needs the model's safetensors checkpoint (a model directory)"
        if shape.outside_bytes + shape.block_bytes > max_host:
            parts.append(f"the non-block modules ({fmt_bytes(shape.outside_bytes)}) and one block "
                         f"({fmt_bytes(shape.block_bytes)}) alone need more than the CPU RAM budget of "
                         f"{fmt_bytes(max_host)}")
        else:
            parts.append(f"CPU RAM needs at least {fmt_bytes(least_host.need()[1])} (with {what}), more than "
                         f"its budget of {fmt_bytes(max_host)}{extra}")
    if not parts:  # each fits alone, never together
        parts.append("no single setting fits both budgets at once")
    return "the run does not fit the memory budget: " + "; ".join(parts)


__all__ = ["DEVICE_RESERVE", "Estimate", "GiB", "HOST_MARGIN", "MemoryPlan", "ModelShape", "Peak", "Settings",
           "UNREAD", "cache_order", "choose", "current_rss", "estimate", "fmt_bytes", "machine_budgets", "parse_size",
           "unread_mapped_bytes"]
