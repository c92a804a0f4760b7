#!/usr/bin/env bash
# Issue 13's table in one or two device calls: `signround bench` at real block dimensions, ours vs
# auto-round 0.16.1 in the same process. Run from the repo root:
#
#   bash tests/bench/gpu_scale.sh a      # 2b and 8b, plus the profile of one 8b block (prof-8b/)
#   bash tests/bench/gpu_scale.sh b      # 70b
#   bash tests/bench/gpu_scale.sh tiny   # a dry run on a CPU (no wheels; uses $PYTHON, default python3)
#
# On the device machine: carry `.whl` (orjson, auto-round 0.16.1 and the auto-round needs the
# image lacks) and name the commit, e.g.
#   SIGNROUND_COMMIT=<hash> bash tests/bench/gpu_scale.sh a
# Environment: OUT (default /tmp/gpu_scale-out), BENCH_ARGS (added to every bench call, e.g.
# "--reference-low-mem"), PYTHON.
#
# Written to $OUT: gpu_scale-PART.log (everything), bench-SIZE.json (every number), performance-PART.json
# (the spec/performance.json records of this part), prof-8b/{ops.txt,memory_snapshot.pickle}: six files
# at most per part, inside the device tool's eight.
#
# Time estimate on an H200, from issue 13's numbers (ours 2.7 / 9.8 / 33.7 s per block steady,
# auto-round 4.4 / 11.6 / 35.9, first block +12-32 s each) plus ~20 s of imports per size, the model
# built on the CPU and moved, capture and scoring (a few s):
#   a: install ~10 s; 2b ~20 + 3 + ours 4x2.7+22 (~35) + auto-round ~10+4x4.4+20 (~50) + scoring ~5 = ~115 s;
#      8b ~20 + 8 + ours 3x9.8+12 (~45) + auto-round ~10+3x11.6+15 (~60) + scoring ~8 + profile ~30 = ~170 s;
#      part a ~5 min (~7 with BENCH_ARGS=--reference-low-mem).
#   b: install ~10 s; 70b ~20 + build ~25 + ours 2x33.7+32 (~100) + auto-round ~10+2x35.9+32 (~115)
#      + scoring ~10 = ~4.5 min (~6.5 with --reference-low-mem).
# Each size runs under its own timeout (below) so that one stuck size leaves the others' files.
set -uo pipefail

PART=${1:?usage: bash tests/bench/gpu_scale.sh a|b|tiny}
REPO=$PWD
OUT=${OUT:-/tmp/gpu_scale-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the bench runs from /tmp
LOG=$OUT/gpu_scale-$PART.log
: >"$LOG"
PY=${PYTHON:-python3}
[ -f "$REPO/__init__.py" ] && [ -f "$REPO/cli.py" ] || { echo "run from the signround repo root" >&2; exit 2; }

if [ "$PART" != tiny ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed (did the call carry .whl?)" | tee -a "$LOG"; exit 1; }
fi
# The repo root is the package `signround`; on the device its folder has another name.
mkdir -p /tmp/pkg && ln -sfn "$REPO" /tmp/pkg/signround
export PYTHONPATH=/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/inductor-cache/triton
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export SIGNROUND_COMMIT=${SIGNROUND_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)}
mkdir -p "$TRITON_CACHE_DIR"

{
  echo "== gpu_scale part $PART  $(date -u +%FT%TZ)  commit ${SIGNROUND_COMMIT:-unknown}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  (cd /tmp && "$PY" - <<'EOF'
import importlib, importlib.metadata as md
for name in ("torch", "transformers", "accelerate", "auto-round", "datasets", "pyarrow", "fsspec", "pydantic",
             "typing_extensions", "huggingface-hub", "orjson"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} missing")
import signround
print("  signround from", signround.__file__)
try:
    importlib.import_module("auto_round")
    print("  auto_round imports")
except Exception as err:  # the bench then records the error and runs ours alone
    print(f"  auto_round does NOT import: {type(err).__name__}: {err}")
EOF
  )
} 2>&1 | tee -a "$LOG"

FAILED=()
run() {  # run SIZE SECONDS [extra bench flags...]
  local size=$1 limit=$2
  shift 2
  echo "== bench --dims $size (limit ${limit}s)  $(date -u +%T)" | tee -a "$LOG"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  (cd /tmp && timeout --kill-after=15 "$limit" "$PY" -m signround bench --dims "$size" \
      --json "$OUT/bench-$size.json" "$@" ${BENCH_ARGS:-}) 2>&1 | grep -v '^RESULT ' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { FAILED+=("$size (exit $rc)"); echo "== $size FAILED: exit $rc" | tee -a "$LOG"; }
}

case $PART in
  a) echo "== gpu_check (compiled vs eager, host cache, host syncs)" | tee -a "$LOG"
     (cd /tmp && timeout 150 "$PY" "$REPO/tests/bench/gpu_check.py" --json "$OUT/check.json") >>"$LOG" 2>&1 \
       || echo "== gpu_check FAILED" | tee -a "$LOG"
     run 2b 220
     run 8b 300 --profile "$OUT/prof-8b" ;;
  b) run 70b 540 ;;
  tiny) run tiny 300 --device cpu --profile "$OUT/prof-tiny" ;;
  *) echo "unknown part $PART (a, b or tiny)" >&2; exit 2 ;;
esac

# The table last: one row per size, and this part's spec/performance.json records.
"$PY" - "$OUT" "$PART" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out, part = Path(sys.argv[1]), sys.argv[2]
order = {"2b": 0, "8b": 1, "70b": 2}
rows = sorted((json.loads(p.read_text()) for p in out.glob("bench-*.json")), key=lambda r: order.get(r["dims"], 9))
f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
g = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
print(f"{'dims':6}{'ours s':>8}{'ref s':>8}{'speedup':>8}{'ours+1st':>9}{'ref+1st':>8}{'ours GiB':>9}{'ref GiB':>8}"
      f"{'ratio':>6}{'ours net':>9}{'ref net':>8}{'model':>7}{'loss':>7}  ref_low_mem s / GiB")
records = {}
for r in rows:
    s, a, lm = r["signround"], r.get("auto_round") or {}, r.get("auto_round_low_mem") or {}
    records[r["dims"]] = r["summary"]
    low = f"{f(lm.get('steady_seconds_per_block'))} / {g(lm.get('peak_memory_bytes'))}" if lm else "-"
    if "error" in a:
        low += f"   auto-round: {a['error'][:80]}"
    print(f"{r['dims']:6}{f(s['steady_seconds_per_block']):>8}{f(a.get('steady_seconds_per_block')):>8}"
          f"{f(r.get('speedup_steady')):>8}{f(s.get('first_block_overhead_seconds'), 1):>9}"
          f"{f(a.get('first_block_overhead_seconds'), 1):>8}{g(s['peak_memory_bytes']):>9}{g(a.get('peak_memory_bytes')):>8}"
          f"{f(r.get('peak_ratio')):>6}{g(s.get('peak_net_bytes')):>9}{g(a.get('peak_net_bytes')):>8}"
          f"{g(r.get('model_bytes')):>7}{f(r.get('loss_ratio'), 3):>7}  {low}")
    if "profile" in r:
        p = r["profile"]
        note = p.get("skipped") or p.get("error")
        if not note:
            note = (f"{p['iters']} steps of one block, GEMM share of kernel time {f(p.get('gemm_share'))}, "
                    f"peak {g(p.get('peak_memory_bytes'))} GiB, {p.get('ops_table')}")
        print(f"  profile: {note}")
print("(s = steady seconds per block; +1st = first-block overhead; net = peak minus what was resident at the "
      "tool's start: the fp model and the tool's copy, 'model' GiB each)")
(out / f"performance-{part}.json").write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
print(f"records for spec/performance.json: {out / f'performance-{part}.json'}")
EOF

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "== failed: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "== part $PART done  $(date -u +%T)" | tee -a "$LOG"
