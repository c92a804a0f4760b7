"""Issue 19: re-scoring rounds of the mixed plan on its RTN-quantized model, with the plan's RTN
perplexity as the fast proxy (spec/mixed-precision.md §4, spec/accuracy.md Issue 19).

    python tests/bench/rescore_rounds.py MODEL TARGET OUT.json     # MODEL: a HF dir, or smollm2

Same calibration windows and evaluation as `accuracy.py`'s reduced recipe (16 x 256 news tokens,
document seed 42; 8 x 512 tokens of wiki-eval.txt), one thread, CPU. Scores the full-precision model
(round 0), then the model with round 0's plan rounded to nearest (round 1), then round 1's (round 2),
and solves on each and on the means of rounds; prints and writes every plan's RTN perplexity.
"""
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import accuracy as A
from signround.adapters.frontends import mixed
from signround.adapters.engine.scheme import score_layers
from signround.adapters.hf.blocks import select_layers
from signround.rounding.budget import solve
from signround.templating import text_calibration_set

model_arg = sys.argv[1] if sys.argv[1] != "smollm2" else None
target = float(sys.argv[2]); out = sys.argv[3]
torch.set_num_threads(1)
args = A.parse(["--configs", "", "--calib-seed", "42", "--iters", "16", "--nsamples", "16", "--seqlen", "256",
                "--batch-size", "4", "--eval-windows", "8", "--eval-seqlen", "512", "--threads", "1", "--device", "cpu"]
               + ([] if model_arg is None else ["--model", model_arg]))
recipe = A.resolve_recipe(args.recipe, iters=16, nsamples=16, seqlen=256, batch_size=4)
teacher, tok, name, label = A.load_model(model_arg, torch.float32)
docs = A.read_documents(A.DEFAULT_CALIB)
calib = text_calibration_set(docs, tok, seqlen=256, nsamples=16, seed=42, source="x")
ids = torch.stack([s["input_ids"] for s in calib.samples]); batches = [ids[i:i+4] for i in range(0, 16, 4)]
eval_ids = torch.tensor(tok(A.read_eval_text(A.DEFAULT_EVAL))["input_ids"], dtype=torch.long)
request = mixed.MixedRequest.of(target, "W2G64,W3G64,W4G64,W8G64")
blocks = A.find_block_lists(teacher)
priced = mixed.price(teacher, blocks, select_layers(teacher, blocks, request.candidates[0], {}), {}, {}, request, "auto_round")
per_layer = {}
for _, layers, opts in priced.groups:
    for i, n in enumerate(layers):
        per_layer[n] = {c: f[i] for c, f, _ in opts}
cands = {n: tuple(m.values()) for n, m in per_layer.items()}

def plan_of(loss):
    byc = {n: dict(zip(m, loss[n])) for n, m in per_layer.items()}
    sol = solve(priced.items(byc), target)
    specs = {}
    for (gname, layers, opts), chosen in zip(priced.groups, sol.choice):
        c, fitted, b = next(o for o in opts if mixed.scheme_name(o[0]) == chosen)
        for n in layers: specs[n] = fitted[0]
    return specs, sol

def rtn_ppl(specs):
    from collections import Counter
    glob = Counter(specs.values()).most_common(1)[0][0]
    m = copy.deepcopy(teacher)
    m, _ = A.run_rtn(m, glob, "cpu", specs)
    t = time.perf_counter(); p = A.evaluate(m, eval_ids, args, torch.float32); del m
    return p

res = {}
def rec(tag, loss, secs):
    specs, sol = plan_of(loss)
    from collections import Counter
    per = Counter(f"W{s.bits}" for s in specs.values())
    p = rtn_ppl(specs)
    res[tag] = {"ppl": p, "per": dict(per), "avg": sol.average_bits, "score_s": secs, "specs": {n: s.bits for n, s in specs.items()}}
    print(f"{tag}: rtn ppl {p:.1f} {dict(per)} avg {sol.average_bits:.4f} score {secs:.0f}s", flush=True)
    json.dump(res, open(out, "w"), indent=1)
    return specs

s0 = score_layers(teacher, batches, cands, device="cpu")
p0 = rec("r0", s0.loss, s0.seconds)
s1 = score_layers(teacher, batches, cands, device="cpu", quantized=p0)
p1 = rec("r1", s1.loss, s1.seconds)
mean01 = {n: tuple((a + b) / 2 for a, b in zip(s0.loss[n], s1.loss[n])) for n in s0.loss}
rec("mean01", mean01, 0)
s2 = score_layers(teacher, batches, cands, device="cpu", quantized=p1)
p2 = rec("r2", s2.loss, s2.seconds)
mean012 = {n: tuple((a + b + c) / 3 for a, b, c in zip(s0.loss[n], s1.loss[n], s2.loss[n])) for n in s0.loss}
rec("mean012", mean012, 0)
mean12 = {n: tuple((b + c) / 2 for b, c in zip(s1.loss[n], s2.loss[n])) for n in s0.loss}
rec("mean12", mean12, 0)
