"""Mixed precision at a bit budget: candidates → prices → scores → the knapsack → a layer_config.

`MixedRequest` is what the user asks (`target_bits`, `candidates`, `fuse_groups`), checked at the
edge. `price` lists what the budget chooses between, before any data is read: every searched layer
(a Linear inside the blocks that no user layer_config key decides) or fused group with the
candidates its shape takes, each priced in stored bits as `signround inspect` counts them
(`checkpoint.inspect.layer_tensors`); layers the user fixed count at their own grid. An
unreachable budget fails there, naming the least achievable average. `choose` scores the
candidates on calibration data (`engine.scheme.score_layers`), solves (`rounding.budget.solve`)
and returns a `MixedPlan`: data, written as a layer_config JSON the user can edit and pass back.
spec/mixed-precision.md is the normative description.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Optional, Union

import attrs
import orjson
import torch
from torch import nn

from signround.adapters.checkpoint.formats import GGUF_METHOD, get_format
from signround.adapters.checkpoint.inspect import layer_tensors, stored_bits
from signround.adapters.checkpoint.rules import match_rule
from signround.adapters.checkpoint.targets import fused_groups
from signround.adapters.engine.scheme import score_layers
from signround.adapters.hf.blocks import LayerPlan, linear_shape, select_layers
from signround.rounding import QuantSpec
from signround.rounding.budget import Item, Option, Solution, near_budget, solve

#: what the budget chooses between when no candidates are given (the issue's list)
DEFAULT_CANDIDATES = ("W2G64", "W3G64", "W4G128", "W8G128")
#: re-scoring rounds on the plan's RTN-quantized model after the first solve (spec/mixed-precision.md §4)
DEFAULT_RESCORE = 0
MAX_RESCORE = 4
#: candidates a choice may take on each side of the budget's share (0: every candidate);
#: spec/mixed-precision.md §6 and spec/accuracy.md "Issue 19, v3"
DEFAULT_SPAN = 0
MAX_SPAN = 8
SCORE_NAME = "fisher_weighted_rtn_output_error"
_SCHEME = re.compile(r"W([2-8])(?:A16)?G(-?\d+)(?:[-_]?(SYM|ASYM))?")


def parse_scheme(text: Union[str, QuantSpec]) -> QuantSpec:
    """'W4G128' (sym), 'W4G128asym', 'W3A16G64', or a QuantSpec → QuantSpec."""
    if isinstance(text, QuantSpec):
        return text
    m = _SCHEME.fullmatch(str(text).strip().upper())
    if m is None:
        raise ValueError(f"candidate {text!r} is not a scheme: write W<bits>G<group>[asym], e.g. W2G64, W4G128, "
                         "W4G128asym (bits 2-8; group -1 = one per row)")
    return QuantSpec(bits=int(m[1]), group_size=int(m[2]), sym=m[3] != "ASYM")


def scheme_name(spec: QuantSpec) -> str:
    return f"W{spec.bits}G{spec.group_size}{'' if spec.sym else 'asym'}"


@attrs.frozen
class MixedRequest:
    """target_bits: average stored bits per weight of the quantized layers (codes, scales, zero
    points); candidates: the grids a searched layer may take; fuse_groups: vLLM's fused q/k/v and
    gate/up layers take one grid together; rescore: re-scoring rounds (§4); span: how many candidates
    on each side of the budget's share a choice may take (0: all; §6)."""

    target_bits: float
    candidates: tuple[QuantSpec, ...]
    fuse_groups: bool = True
    rescore: int = DEFAULT_RESCORE
    span: int = DEFAULT_SPAN

    @classmethod
    def of(cls, target_bits: Any, candidates: Optional[Iterable[Union[str, QuantSpec]]] = None,
           fuse_groups: bool = True, rescore: Optional[int] = None, span: Optional[int] = None
           ) -> MixedRequest:
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not (
                0 < float(target_bits) <= 32):
            raise ValueError(f"target_bits must be a number of bits per weight such as 3.0 (scales and zero points "
                             f"counted), got {target_bits!r}")
        rescore = DEFAULT_RESCORE if rescore is None else rescore
        if isinstance(rescore, bool) or not isinstance(rescore, int) or not 0 <= rescore <= MAX_RESCORE:
            raise ValueError(f"rescore must be a whole number of re-scoring rounds from 0 to {MAX_RESCORE} (0: score "
                             f"the full-precision model only; each round costs one more scoring pass), got {rescore!r}")
        raw = list(DEFAULT_CANDIDATES if candidates is None else
                   ([c for c in candidates.split(",") if c.strip()] if isinstance(candidates, str) else candidates))
        span = DEFAULT_SPAN if span is None else span
        if isinstance(span, bool) or not isinstance(span, int) or not 0 <= span <= MAX_SPAN:
            raise ValueError(f"span must be a whole number from 0 to {MAX_SPAN}: how many candidates a layer may take "
                             f"on each side of the budget (1: the two nearest; 0: every candidate), got {span!r}")
        specs = tuple(dict.fromkeys(parse_scheme(c) for c in raw))
        if not specs:
            raise ValueError("candidates names no scheme; give e.g. candidates=['W2G64', 'W4G128']")
        return cls(float(target_bits), specs, bool(fuse_groups), rescore, span)


@attrs.frozen
class PlanGroup:
    """One choice of the plan: its name (a layer, or a fused group such as `…self_attn.qkv_proj`),
    its layers, the grid chosen, the stored bits and weights of its layers, whether the user fixed
    it, and its score per candidate (name → score; empty when fixed or before scoring)."""

    name: str
    layers: tuple[str, ...]
    spec: QuantSpec
    bits: int
    weights: int
    fixed: bool = False
    scores: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class Priced:
    """What the budget chooses between: per searched group its layers and, per candidate it can
    take, (grid per layer, stored bits); the fixed layers; the format the bits are counted in."""

    groups: tuple[tuple[str, tuple[str, ...], tuple[tuple[QuantSpec, tuple[QuantSpec, ...], int], ...]], ...]
    fixed: tuple[PlanGroup, ...]
    weights: Mapping[str, int]
    format: str

    @property
    def total_weights(self) -> int:
        return sum(self.weights.values())

    def items(self, scores: Optional[Mapping[str, Mapping[QuantSpec, float]]] = None) -> list[Item]:
        """Budget items: one per group (an option's loss is its layers' summed score on that
        candidate; 0 unscored) and one single-option item per fixed layer."""
        out = []
        for name, layers, options in self.groups:
            opts = tuple(Option(scheme_name(cand), bits, 0.0 if scores is None else sum(scores[n][cand] for n in layers))
                         for cand, _, bits in options)
            out.append(Item(name, opts, sum(self.weights[n] for n in layers)))
        out += [Item(f.name, (Option(scheme_name(f.spec), f.bits, 0.0),), f.weights) for f in self.fixed]
        return out


@attrs.frozen
class MixedPlan:
    """The chosen grid of every quantized layer and what it costs (see spec/mixed-precision.md).

    groups: the searched choices then the fixed layers; average_bits: stored bits over weights of
    all quantized layers; budget: the bits the target allowed; exact: optimality proven (else
    gap bounds the lost score); search_seconds: scoring and solving."""

    target_bits: float
    candidates: tuple[QuantSpec, ...]
    fuse_groups: bool
    format: str
    groups: tuple[PlanGroup, ...]
    average_bits: float
    budget: int
    exact: bool
    gap: float
    score_tokens: int
    search_seconds: float
    score_device: str
    rescore: int = 0  # re-scoring rounds asked
    span: int = 0  # candidates a choice could take on each side of the budget (0: all)
    rounds: tuple[Mapping[str, Any], ...] = ()  # per scoring pass: seconds, score loss of its plan, layers changed

    @property
    def score_name(self) -> str:
        """The score the final plan was solved on: the plain score, or re-scored on the plan's RTN model."""
        return SCORE_NAME if self.rescore == 0 else f"{SCORE_NAME}+rescore{self.rescore}_on_plan_rtn"

    @property
    def specs(self) -> dict[str, QuantSpec]:
        return {n: g.spec for g in self.groups for n in g.layers}

    @property
    def global_spec(self) -> QuantSpec:
        """The grid most weights take: the checkpoint's top-level grid (extra_config lists the rest)."""
        weight = Counter()
        for g in self.groups:
            weight[g.spec] += g.weights
        return weight.most_common(1)[0][0]

    def layer_config(self) -> dict[str, dict[str, Any]]:
        """{layer: {bits, group_size, sym}} for every searched layer: what `layer_config=` (or
        `--layer-config plan.json`) takes back."""
        return {n: {"bits": g.spec.bits, "group_size": g.spec.group_size, "sym": g.spec.sym}
                for g in self.groups if not g.fixed for n in g.layers}

    def to_json(self) -> bytes:
        return orjson.dumps(self.layer_config(), option=orjson.OPT_INDENT_2) + b"\n"

    def summary(self) -> dict[str, Any]:
        """What the checkpoint records of the search (`signround_settings.mixed_precision`)."""
        counts = Counter()
        for g in self.groups:
            counts[scheme_name(g.spec)] += len(g.layers)
        return {"target_bits": self.target_bits, "average_bits": round(self.average_bits, 6),
                "candidates": [scheme_name(c) for c in self.candidates], "fuse_groups": self.fuse_groups,
                "bits_counted_as": self.format, "layers_per_scheme": dict(counts), "exact": self.exact,
                "gap": self.gap, "score": self.score_name, "rescore": self.rescore, "span": self.span,
                "scoring_passes": len(self.rounds), "score_tokens": self.score_tokens,
                "search_seconds": round(self.search_seconds, 2)}

    def describe(self) -> list[str]:
        """Lines for `--dry-run`: one per choice (block-wise order), then the totals."""
        lines = [f"mixed precision: target {self.target_bits} bits per weight, candidates "
                 f"{', '.join(scheme_name(c) for c in self.candidates)}, bits counted as format {self.format}"
                 + (f"; each choice among the {self.span} candidate(s) on either side of the budget" if self.span else "")]
        width = max(len(g.name) for g in self.groups)
        for g in self.groups:
            per = g.bits / g.weights if g.weights else 0.0
            tag = " (fixed by layer_config)" if g.fixed else ""
            lines.append(f"  {g.name:<{width}}  {scheme_name(g.spec):<10} {per:7.4f} bits/weight{tag}")
        counts = Counter()
        for g in self.groups:
            counts[scheme_name(g.spec)] += len(g.layers)
        lines.append("layers per scheme: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines.append(f"average: {self.average_bits:.4f} bits per weight (budget {self.target_bits}); "
                     + ("optimal for the scores" if self.exact else f"search stopped, within {self.gap:.4g} of optimal")
                     + f"; scored on {self.score_tokens} tokens on {self.score_device}, {self.search_seconds:.1f}s"
                     + (f", {len(self.rounds)} scoring passes (re-scored on the plan's RTN model)" if self.rescore else ""))
        return lines


def _fitted(model: nn.Module, blocks: Sequence[str], cand: QuantSpec) -> LayerPlan:
    return select_layers(model, blocks, cand, {})


def price(model: nn.Module, blocks: Sequence[str], plan: LayerPlan, layer_config: Mapping[str, Any],
          outside: Mapping[str, QuantSpec], request: MixedRequest, fmt: str) -> Priced:
    """What the budget chooses between (module docstring); ValueError when a candidate cannot be
    written in `fmt`, a fused group has no candidate all its layers take, or a layer takes none."""
    f = get_format(fmt)
    if f.quant_method == GGUF_METHOD:
        raise ValueError(f"target_bits prices checkpoints of format auto_round, auto_gptq or compressed_tensors; "
                         f"{fmt!r} stores GGUF blocks of its own type (choose the type instead)")
    for cand in request.candidates:
        refusal = f.refusal({scheme_name(cand): cand})
        if refusal:
            raise ValueError(f"candidate {scheme_name(cand)}: {refusal}")
    fitted = {c: _fitted(model, blocks, c).quantize for c in request.candidates}
    searched = [n for n in plan.quantize if match_rule(layer_config, n) is None]
    shapes = {n: linear_shape(model.get_submodule(n)) for n in [*plan.quantize, *outside]}
    weights = {n: out * inn for n, (out, inn) in shapes.items()}

    def bits(name: str, spec: QuantSpec) -> int:
        out, inn = shapes[name]
        return stored_bits(layer_tensors(fmt, spec, inn, out).values())

    members: list[tuple[str, tuple[str, ...]]] = []
    if request.fuse_groups:
        grouped = fused_groups(searched)
        in_group = {n for _, ms in grouped for n in ms}
        members = [(g, tuple(ms)) for g, ms in grouped]
        members += [(n, (n,)) for n in searched if n not in in_group]
        order = {n: i for i, n in enumerate(searched)}
        members.sort(key=lambda gm: order[gm[1][0]])
    else:
        members = [(n, (n,)) for n in searched]
    groups = []
    for name, layers in members:
        options = []
        for cand in request.candidates:
            if all(n in fitted[cand] for n in layers):
                per_layer = tuple(fitted[cand][n] for n in layers)
                options.append((cand, per_layer, sum(bits(n, s) for n, s in zip(layers, per_layer))))
        if not options:
            what = "fused group " + name + f" ({', '.join(layers)})" if len(layers) > 1 else "layer " + name
            raise ValueError(f"{what} takes none of the candidates {', '.join(scheme_name(c) for c in request.candidates)}"
                             f" (its in_features {shapes[layers[0]][1]} fit no group size given); add one that fits, "
                             "e.g. W4G32 or W4G-1" + (", or pass fuse_groups=False" if len(layers) > 1 else ""))
        groups.append((name, layers, tuple(options)))
    fixed = [PlanGroup(n, (n,), s, bits(n, s), weights[n], fixed=True)
             for n, s in [*((n, plan.quantize[n]) for n in plan.quantize if n not in set(searched)), *outside.items()]]
    if not groups:
        raise ValueError("target_bits has nothing to choose: layer_config fixes every quantized layer; drop the "
                         "layer_config or target_bits")
    return Priced(tuple(groups), tuple(fixed), weights, fmt)


def check_reachable(priced: Priced, request: MixedRequest) -> None:
    """BudgetError (naming the least achievable average) before any data is read."""
    solve(priced.items(), request.target_bits, node_limit=0)


def _tied_to_embeddings(model: nn.Module, name: str) -> bool:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    w = getattr(model.get_submodule(name), "weight", None)
    return emb is not None and w is not None and w is getattr(emb, "weight", None)


def choose(model: nn.Module, batches: Iterable[Any], priced: Priced, request: MixedRequest, *,
           device: Union[str, torch.device, None] = None) -> MixedPlan:
    """Score, solve, and return the plan. With `request.rescore` rounds, each round scores again on
    the model with the last plan rounded to nearest in place (every searched and fixed layer on its
    grid; a layer tied to the input embeddings is left alone), where the errors of the other layers
    compound, and solves again; it stops early when a round leaves the plan unchanged."""
    import time

    start = time.perf_counter()
    batches = list(batches)  # read once per scoring pass
    # each layer is scored on its own fitted grid of every candidate its group takes
    per_layer: dict[str, dict[QuantSpec, QuantSpec]] = {}
    for _, layers, opts in priced.groups:
        for i, n in enumerate(layers):
            per_layer[n] = {cand: fitted[i] for cand, fitted, _ in opts}
    to_score = {n: tuple(m.values()) for n, m in per_layer.items()}
    fixed = {n: f.spec for f in priced.fixed for n in f.layers if not _tied_to_embeddings(model, n)}

    def specs_of(solution: Solution) -> dict[str, QuantSpec]:
        out = {}
        for (_, layers, opts), chosen in zip(priced.groups, solution.choice):
            out.update(zip(layers, next(o[1] for o in opts if scheme_name(o[0]) == chosen)))
        return out

    rounds: list[dict[str, Any]] = []
    plan_specs: Optional[dict[str, QuantSpec]] = None
    scores = by_candidate = solution = None
    for r in range(request.rescore + 1):
        scores = score_layers(model, batches, to_score, device=device,
                              quantized=None if plan_specs is None else {**plan_specs, **fixed})
        by_candidate = {n: dict(zip(m, scores.loss[n])) for n, m in per_layer.items()}
        items = priced.items(by_candidate)
        solution = solve(near_budget(items, request.target_bits, request.span) if request.span else items,
                         request.target_bits)
        new_specs = specs_of(solution)
        changed = None if plan_specs is None else sum(new_specs[n] != plan_specs[n] for n in new_specs)
        rounds.append({"round": r, "on": "full precision" if plan_specs is None else "plan rounded to nearest",
                       "seconds": round(scores.seconds, 2), "loss": solution.loss, "layers_changed": changed})
        plan_specs = new_specs
        if changed == 0:
            break  # a fixed point: another round would score the same model again
    assert scores is not None and by_candidate is not None and solution is not None
    groups = []
    for (name, layers, opts), chosen in zip(priced.groups, solution.choice):
        cand, fitted, b = next(o for o in opts if scheme_name(o[0]) == chosen)
        # fused layers share their input, so one fitted grid (a narrow layer: one group per row)
        groups.append(PlanGroup(name, layers, fitted[0], b, sum(priced.weights[n] for n in layers),
                                scores={scheme_name(c): sum(by_candidate[n][c] for n in layers) for c, _, _ in opts}))
    all_groups = (*groups, *priced.fixed)
    return MixedPlan(target_bits=request.target_bits, candidates=request.candidates, fuse_groups=request.fuse_groups,
                     format=priced.format, groups=all_groups, average_bits=solution.average_bits,
                     budget=solution.budget, exact=solution.exact, gap=solution.gap, score_tokens=scores.tokens,
                     search_seconds=time.perf_counter() - start, score_device=scores.device,
                     rescore=request.rescore, rounds=tuple(rounds), span=request.span)
