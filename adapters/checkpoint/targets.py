"""Will a checkpoint load where it is served? Verdicts per target runtime, from the plan alone.

A `CheckpointView` is what a runtime sees of a checkpoint: the export format and packing, and every
Linear that matters (inside the quantized blocks, plus quantized layers outside them such as
`lm_head`) with its shape and grid (None: full precision). It is built either from a plan before
any tuning (`plan_view`: names, shapes and specs) or from an existing checkpoint (`checkpoint_view`:
config.json and safetensors headers, ours or auto-round's). `check` gives one `Verdict` per target.

The rules are ours, written from the loaders' source (cited in spec/format.md, "Loadability"):
vLLM 0.33.0 (`inc` and `gptq` quantization configs, the MP-linear kernel choice, the fused-module
check), transformers 5 + auto-round 0.16.1 (`inference/backend.py` backends, `get_layer_config`),
our loader (the packing table), llama.cpp (GGUF block sizes). `harmonize_fused` is the one
adjustment `target=("vllm",)` may make: the members of a fused group (q/k/v, gate/up) take the
strictest scheme among them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from signround.adapters.checkpoint.formats import (
    AWQ_PACKING,
    NATIVE_PACKING,
    SYM_PACKING,
    COMPRESSED_METHOD,
    FORMAT_NAMES,
    Packing,
    get_format,
)
from signround.rounding.spec import QuantSpec

TRANSFORMERS, VLLM, SIGNROUND, LLAMA_CPP = "transformers", "vllm", "signround", "llama.cpp"
#: the runtimes `check` judges, in the order verdicts are printed
TARGETS = (TRANSFORMERS, VLLM, SIGNROUND, LLAMA_CPP)
TARGET_HELP = {
    TRANSFORMERS: "transformers + auto-round (CPU torch backends)",
    VLLM: "vLLM 0.33 (H200, sm_90)",
    SIGNROUND: "signround load_quantized",
    LLAMA_CPP: "llama.cpp (GGUF)",
}
#: vLLM stacks these checkpoint projections into one parameter (`packed_modules_mapping` of its
#: Llama/Qwen2/Mistral/Gemma-3 models: qkv_proj <- q/k/v_proj, gate_up_proj <- gate/up_proj)
FUSED_GROUPS: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
VISION_MARKERS = ("vision", "visual", "image", "img")
#: group sizes Marlin takes (`marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES`; -1 = one group per row)
VLLM_MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
#: widths vLLM's inc config sends to the Humming kernels on CUDA, GPTQ or AWQ layout, sym or asym
#: (`inc_wna16_scheme.CUDA_HUMMING_SUPPORTED_BITS`)
VLLM_HUMMING_BITS = (2, 3, 5, 6, 7)
#: ParallelLMHead rounds the vocabulary up to this (`vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE`)
VLLM_VOCAB_PADDING = 64


def _is_vision(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in VISION_MARKERS)


@attrs.frozen
class LayerView:
    """One Linear as a runtime sees it. spec None: kept in full precision. in_blocks: under one of
    the checkpoint's block prefixes (`block_name_to_quantize`)."""

    name: str
    in_features: int
    out_features: int
    spec: QuantSpec | None
    in_blocks: bool = True

    @property
    def vision(self) -> bool:
        return _is_vision(self.name)

    @property
    def is_lm_head(self) -> bool:
        return not self.in_blocks and self.name.rsplit(".", 1)[-1] in ("lm_head", "output")


@attrs.frozen
class CheckpointView:
    """What a runtime reads: export format (`formats.EXPORT_FORMATS` name), packing (None for formats
    without one), the layers, and whether `lm_head` shares the embedding matrix."""

    format: str
    packing: Packing | None
    layers: tuple[LayerView, ...]
    tied_lm_head: bool = False

    @property
    def quantized(self) -> tuple[LayerView, ...]:
        return tuple(layer for layer in self.layers if layer.spec is not None)


@attrs.frozen
class Verdict:
    """Whether `target` loads the checkpoint; problems say why not (one line each, layer named),
    notes what loads but deserves a word (a CPU-only gap, a precision cast)."""

    target: str
    loads: bool
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        head = f"{self.target}: {'loads' if self.loads else 'FAILS'}"
        parts = [*self.problems, *(f"note: {n}" for n in self.notes)]
        return head + ("" if not parts else " — " + "; ".join(parts))


class UnloadableError(ValueError):
    """A plan that a requested target cannot load (raised before any tuning)."""


# -- views ------------------------------------------------------------------------------------
def plan_view(fmt: str, shapes: Mapping[str, tuple[int, int]], specs: Mapping[str, QuantSpec],
              block_prefixes: Sequence[str], *, tied_lm_head: bool = False) -> CheckpointView:
    """The view of a plan: shapes = every Linear inside the blocks (and quantized ones outside) →
    (out_features, in_features); specs = the quantized ones → grid; the rest stay full precision."""
    f = get_format(fmt)
    packing = f.choose_packing(_global(specs.values()), specs.values()) if specs else None
    layers = tuple(LayerView(name, inn, out, specs.get(name), _under(name, block_prefixes))
                   for name, (out, inn) in shapes.items())
    return CheckpointView(fmt, packing, layers, tied_lm_head=tied_lm_head)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _global(specs: Iterable[QuantSpec]) -> QuantSpec:
    from collections import Counter

    return Counter(specs).most_common(1)[0][0]


def checkpoint_view(info: Mapping[str, Any]) -> CheckpointView:
    """The view of an existing checkpoint from `inspect.inspect_checkpoint`'s summary."""
    fmt = info.get("format") or "auto_round"
    packing = None
    if info.get("packing"):
        from signround.adapters.checkpoint.formats import get_packing

        packing = get_packing(info["packing"])
    blocks = [p for p in str(info.get("block_name_to_quantize") or "").split(",") if p]
    layers: list[LayerView] = []
    def inside(name: str) -> bool:  # no block list (compressed-tensors): all but the embeddings and the head
        return _under(name, blocks) if blocks else not re.search(r"(^|\.)(lm_head|embed_tokens|wte|output)$", name)

    for name, v in info.get("layers", {}).items():
        spec = None if v.get("bits") is None else QuantSpec(v["bits"], v["group_size"], v["sym"])
        layers.append(LayerView(name, v.get("in_features") or 0, v.get("out_features") or 0, spec, inside(name)))
    for name, (out, inn) in info.get("full_precision_shapes", {}).items():
        if inside(name):
            layers.append(LayerView(name, inn, out, None, True))
    return CheckpointView(fmt, packing, tuple(layers), tied_lm_head=bool(info.get("tied_lm_head")))


# -- fused groups -----------------------------------------------------------------------------
#: an unfused MoE expert's matrix ("model.layers.0.mlp.experts.3.w1", `hf/experts.py`): vLLM loads all
#: experts of one module into one FusedMoE layer (`INCConfig` config_parser: "Fused MoE layer … requires
#: consistent quant config for all sub-layers")
_EXPERT = re.compile(r"^(?P<owner>.+\.experts)\.\d+\.[^.]+$")


def fused_groups(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(fused name, member layer names) for every q/k/v and gate/up set present, e.g.
    ("model.layers.0.self_attn.qkv_proj", [".q_proj", ".k_proj", ".v_proj"]), and every MoE
    experts module with all its expert matrices ("model.layers.0.mlp.experts", [….experts.0.w1, …])."""
    by_parent: dict[tuple[str, str], list[str]] = {}
    experts: dict[str, list[str]] = {}
    for name in names:
        moe = _EXPERT.match(name)
        if moe:
            experts.setdefault(moe["owner"], []).append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        for fused, members in FUSED_GROUPS.items():
            if leaf in members:
                by_parent.setdefault((parent, fused), []).append(name)
    return [(f"{parent}.{fused}" if parent else fused, sorted(found, key=lambda n: FUSED_GROUPS[fused].index(
        n.rpartition(".")[2]))) for (parent, fused), found in by_parent.items() if len(found) > 1] + \
        [(owner, found) for owner, found in experts.items() if len(found) > 1]


def _strictness(spec: QuantSpec | None, in_features: int) -> tuple[int, int, int]:
    """Bigger is stricter (keeps more precision): full precision, then more bits, then smaller
    groups, then asym (a zero point per group)."""
    if spec is None:
        return (99, 0, 0)
    groups = spec.num_groups(in_features)
    return (spec.bits, groups, 0 if spec.sym else 1)


def harmonize_fused(layers: Mapping[str, QuantSpec | None], in_features: Mapping[str, int]
                    ) -> tuple[dict[str, QuantSpec | None], list[str]]:
    """Give every member of a fused group the strictest member's scheme (None = full precision).

    Returns the new name → spec mapping (all names, changed or not) and one message per group
    changed. The strictest keeps the most precision: full precision > more bits > more groups >
    asym, so no layer loses precision it was given."""
    out = dict(layers)
    messages = []
    for fused, members in fused_groups(layers):
        chosen = max(members, key=lambda n: _strictness(layers[n], in_features[n]))
        spec = layers[chosen]
        changed = [n for n in members if layers[n] != spec]
        if not changed:
            continue
        for n in changed:
            out[n] = spec
        what = "full precision" if spec is None else _describe(spec)
        messages.append(f"{fused}: vLLM fuses {_members(fused, members)} into one "
                        f"parameter, so {_members(fused, changed)} now use {what} "
                        f"(as {_members(fused, [chosen])})")
    return out, messages


def _members(fused: str, names: Sequence[str], most: int = 6) -> str:
    """Member names short: the leaf (q_proj), or the expert and leaf under an experts module (3.w1)."""
    short = [n[len(fused) + 1:] if n.startswith(fused + ".") else n.rpartition(".")[2] for n in names]
    return ", ".join(short[:most]) + (f" (+{len(short) - most} more)" if len(short) > most else "")


def _describe(spec: QuantSpec) -> str:
    return f"W{spec.bits} g{spec.group_size} {'sym' if spec.sym else 'asym'}"


# -- rules per target -------------------------------------------------------------------------
def _layer_problem_common(layer: LayerView) -> str | None:
    s = layer.spec
    assert s is not None
    if layer.in_features % 32 or layer.out_features % 32:
        return f"{layer.name}: shape [{layer.out_features}, {layer.in_features}] is not a multiple of 32"
    if s.group_size not in (-1, 0) and s.group_size < layer.in_features and layer.in_features % s.group_size:
        return f"{layer.name}: group_size {s.group_size} does not divide in_features {layer.in_features}"
    return None


def _signround(view: CheckpointView) -> Verdict:
    if view.format.startswith("gguf"):
        return Verdict(SIGNROUND, False, ("load_quantized reads safetensors checkpoints, not GGUF",))
    problems = []
    for layer in view.quantized:
        common = _layer_problem_common(layer)
        if common:
            problems.append(common)
        if view.packing is not None and layer.spec.bits not in view.packing.bits:  # type: ignore[union-attr]
            problems.append(f"{layer.name}: the {view.packing.name} packing holds {view.packing.bits} bits, "
                            f"not {layer.spec.bits}")  # type: ignore[union-attr]
    return Verdict(SIGNROUND, not problems, tuple(problems))


def _transformers(view: CheckpointView) -> Verdict:
    """transformers 5 with auto-round 0.16.1's `AutoRoundConfig` (inference/backend.py BackendInfos)."""
    fmt, packing = view.format, view.packing
    notes: list[str] = []
    problems: list[str] = []
    if fmt.startswith("gguf"):
        return Verdict(TRANSFORMERS, True, notes=("transformers reads GGUF (gguf_file=) by dequantizing every "
                                                  "tensor to full precision",))
    if fmt == "auto_gptq":
        notes.append("quant_method gptq goes through transformers' GPTQ integration (the gptqmodel package), "
                     "not auto-round")
    if fmt == "compressed_tensors":
        notes.append("through transformers' compressed-tensors integration (the compressed-tensors package)")
        asym = [layer.name for layer in view.quantized if not layer.spec.sym]  # type: ignore[union-attr]
        if asym:
            problems.append(f"{asym[0]} (and {len(asym) - 1} more): transformers 5.24 + compressed-tensors 0.20 "
                            "build asym layers with an unpacked zero point [N, G] while the pack-quantized "
                            "compressor writes it packed [N·bits/32, G] (size mismatch on load)")
    for layer in view.quantized:
        s = layer.spec
        assert s is not None
        common = _layer_problem_common(layer)
        if common:
            problems.append(common)
        if packing is SYM_PACKING and not s.sym:
            problems.append(f"{layer.name}: asym in the GPTQ v1 layout (zero − 1) has no CPU backend "
                            "(auto_round:torch_zp is sym-only)")
    if packing is AWQ_PACKING:
        notes.append("auto_round:auto_awq needs a CUDA AWQ backend: on the CPU auto-round 0.16.1 falls back to "
                     "its fake backend, which fails")
    return Verdict(TRANSFORMERS, not problems, tuple(problems), tuple(notes))


def _vllm_inc_layer(layer: LayerView, packing: Packing, fused: bool) -> str | None:
    """One layer under vLLM's `inc` config (quant_method auto-round) on CUDA: 2/3/5/6/7 bits go to
    Humming (GPTQ or AWQ schema, zero points allowed); 4/8 bits to Marlin, which takes GPTQ sym
    4/8 (`INCWNA16LinearScheme._build_gptq_method`) and AWQ 4 (`_build_awq_method`, AutoAWQConfig
    TYPE_MAP is 4-bit only)."""
    s = layer.spec
    assert s is not None
    if s.bits in VLLM_HUMMING_BITS:
        if packing.awq and fused:
            return (f"{layer.name}: {s.bits}-bit AWQ in a fused module fails to load: Humming's AWQWeightSchema "
                    "declares packed_factor 8 (4-bit) for every width, so the fused shard loader cuts the wrong width")
        return None
    if packing.awq:
        if s.bits != 4:
            return f"{layer.name}: {s.bits}-bit AWQ weights have no vLLM kernel (AWQ/AWQ-Marlin: 4-bit only)"
    elif not s.sym:
        return (f"{layer.name}: {s.bits}-bit asym in the GPTQ layout has no vLLM kernel (Marlin: sym 4/8 only); "
                "4-bit asym is served AWQ-packed")
    if s.group_size not in VLLM_MARLIN_GROUP_SIZES and not (packing.awq and s.bits == 4):
        return f"{layer.name}: group_size {s.group_size} has no Marlin kernel (takes {VLLM_MARLIN_GROUP_SIZES})"
    return None


def _vllm_gptq_layer(layer: LayerView) -> str | None:
    """quant_method gptq: vLLM's AutoGPTQConfig (TYPE_MAP: sym 4/8) for every layer (`override_config`)."""
    s = layer.spec
    assert s is not None
    if (s.bits, s.sym) not in ((4, True), (8, True)):
        return (f"{layer.name}: bits={s.bits}, sym={s.sym} is not served by vLLM's gptq config (sym 4/8 only; "
                "use format auto_round for 2/3-bit)")
    if s.group_size not in VLLM_MARLIN_GROUP_SIZES:
        return f"{layer.name}: group_size {s.group_size} has no Marlin kernel (takes {VLLM_MARLIN_GROUP_SIZES})"
    return None


def _vllm(view: CheckpointView) -> Verdict:
    """vLLM 0.33.0 on an H200 (`inc`, `gptq` and `compressed-tensors` configs; spec/format.md
    "Loadability" cites the functions)."""
    fmt, packing = view.format, view.packing
    problems: list[str] = []
    notes: list[str] = []
    if fmt.startswith("gguf"):
        return Verdict(VLLM, False, ("this check does not judge vLLM's GGUF loader; serve GGUF with llama.cpp",))
    ct = get_format(fmt).quant_method == COMPRESSED_METHOD if fmt in FORMAT_NAMES else False
    inc = not ct and packing is not None and packing.packing_format is not None and packing.checkpoint_format is None
    if packing is NATIVE_PACKING and not ct:
        problems.append("packing_format 'auto_round' (native zero points) is rejected by vLLM's inc config "
                        "(INCConfig.SUPPORTED_FORMATS: Unsupported packing_format); write asym with format "
                        "'auto_round:auto_awq' (2-7 bits) or 'compressed_tensors'")
    fused_members = {m for _, members in fused_groups(layer.name for layer in view.layers if layer.in_blocks)
                     for m in members}
    for layer in view.quantized:
        common = _layer_problem_common(layer)
        if common:
            problems.append(common)
            continue
        if layer.is_lm_head:
            if layer.out_features % VLLM_VOCAB_PADDING:
                problems.append(f"{layer.name}: vLLM pads the vocabulary ({layer.out_features}) to a multiple of "
                                f"{VLLM_VOCAB_PADDING}, and the packed lm_head does not fit the padded parameter")
                continue
            how = ("gptq: the config's lm_head flag" if fmt == "auto_gptq" else
                   "compressed-tensors: a config group's target" if ct else "inc: its extra_config entry")
            notes.append(f"{layer.name}: quantized lm_head loads through vLLM's ParallelLMHead ({how})")
        if ct:
            problem = None  # CompressedTensorsWNA16: 2-8 bits, sym or asym, group or channel (measured: loads)
        elif fmt == "auto_gptq":
            problem = _vllm_gptq_layer(layer)
        elif inc and packing is not NATIVE_PACKING:
            problem = _vllm_inc_layer(layer, packing, layer.name in fused_members)  # type: ignore[arg-type]
        else:
            problem = None
        if problem:
            problems.append(problem)
    by_name = {layer.name: layer.spec for layer in view.layers}
    for fused, members in fused_groups(layer.name for layer in view.layers if layer.in_blocks):
        if len({by_name[m] for m in members}) > 1:
            by_scheme: dict[str, list[str]] = {}
            for m in members:
                by_scheme.setdefault("fp" if by_name[m] is None else _describe(by_name[m]), []).append(m)
            schemes = "; ".join(f"{_members(fused, ms, 3)}: {scheme}" for scheme, ms in by_scheme.items())
            problems.append(f"{fused}: fused module requires one quant config for its members ({schemes})")
    if any(not layer.spec.sym for layer in view.quantized if layer.spec is not None):  # type: ignore[union-attr]
        notes.append("vLLM copies fp16 scales into the model dtype (bf16 models: up to 0.39 % relative change)")
    return Verdict(VLLM, not problems, tuple(problems), tuple(notes))


def _llama_cpp(view: CheckpointView) -> Verdict:
    if not view.format.startswith("gguf"):
        return Verdict(LLAMA_CPP, False, (f"llama.cpp reads GGUF files only; export with format='gguf:q4_0' "
                                          f"(or another gguf type) instead of {view.format!r}",))
    from signround.adapters.checkpoint.formats import gguf_problems

    problems = gguf_problems(view.format, [(layer.name, layer.in_features, layer.spec) for layer in view.quantized])
    return Verdict(LLAMA_CPP, not problems, tuple(problems))


_RULES = {TRANSFORMERS: _transformers, VLLM: _vllm, SIGNROUND: _signround, LLAMA_CPP: _llama_cpp}


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate target names (at the edge: facade and CLI)."""
    out = tuple(dict.fromkeys(t.strip().lower() for t in targets if t.strip()))
    unknown = [t for t in out if t not in _RULES]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    return out


def check(view: CheckpointView, targets: Iterable[str] = TARGETS) -> dict[str, Verdict]:
    """One verdict per target, in the order given."""
    return {t: _RULES[t](view) for t in check_targets(targets)}


def require_loadable(view: CheckpointView, targets: Iterable[str]) -> dict[str, Verdict]:
    """The verdicts, or UnloadableError naming every problem of every target that fails."""
    verdicts = check(view, targets)
    failing = [v for v in verdicts.values() if not v.loads]
    if failing:
        raise UnloadableError("the checkpoint would not load: " + " | ".join(
            f"{v.target}: " + "; ".join(v.problems[:6]) + (f" (+{len(v.problems) - 6} more)" if len(v.problems) > 6
                                                           else "") for v in failing))
    return verdicts



@attrs.frozen
class Fit:
    """What `fit_plan` did: changes (layer → its new grid, None = full precision), one message per
    change, and the verdicts per export format (every requested target loads each)."""

    changes: Mapping[str, QuantSpec | None]
    messages: tuple[str, ...]
    verdicts: Mapping[str, Mapping[str, Verdict]]


def fit_plan(targets: Iterable[str], formats: Iterable[str], shapes: Mapping[str, tuple[int, int]],
             specs: Mapping[str, QuantSpec], block_prefixes: Sequence[str], *, tied_lm_head: bool = False) -> Fit:
    """Adjust a plan for `targets` where that is legitimate, then require every target to load it;
    first of all, a plan a format refuses to write (`ExportFormat.refusal`) is a ValueError.

    With vLLM among the targets, fused groups take their strictest member's scheme
    (`harmonize_fused`); nothing else is changed. Raises `UnloadableError` with every remaining
    problem. shapes / specs / block_prefixes: as `plan_view`."""
    targets = check_targets(targets)
    for fmt in formats:  # what a format refuses to write, with or without targets
        refusal = get_format(fmt).refusal(specs)
        if refusal:
            raise ValueError(refusal)
    changes: dict[str, QuantSpec | None] = {}
    messages: list[str] = []
    if VLLM in targets:
        before = {n: specs.get(n) for n in shapes}
        after, messages = harmonize_fused(before, {n: s[1] for n, s in shapes.items()})
        changes = {n: s for n, s in after.items() if s != before[n]}
        specs = {n: s for n, s in after.items() if s is not None}
    verdicts = {fmt: require_loadable(plan_view(fmt, shapes, specs, block_prefixes, tied_lm_head=tied_lm_head),
                                      targets) for fmt in formats}
    return Fit(changes, tuple(messages), verdicts)
