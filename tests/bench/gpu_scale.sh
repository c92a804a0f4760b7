#!/usr/bin/env bash
# The GPU measurements of issues 13, 16 and 18 in three device calls (each under the 10-minute limit),
# ours vs auto-round 0.16.1 in the same process. Run from the repo root:
#
#   bash tests/bench/gpu_scale.sh a   # 2b (vs auto-round); 2b again with warm compile caches; 2b with the
#                                     # block compiled, cold then warm; SmolLM2-135M block dims (vs auto-round,
#                                     # profiled)                                                        ~6.5 min
#   bash tests/bench/gpu_scale.sh b   # 8b (vs auto-round, profiled), 70b (vs auto-round)                 ~7.5 min
#   bash tests/bench/gpu_scale.sh c   # issue 16: an 8-block 8B-shaped model quantized in RAM and streamed
#                                     # from disk, the two checkpoints compared, the 70B plan; issue 18: CUDA
#                                     # kernel tests, decode/prefill of a Qwen2-1.5B-shaped model, per-layer
#                                     # GEMMs                                                           ~5.5 min
#   bash tests/bench/gpu_scale.sh d   # the defaults of 2026-12-02 (graphs / block compile by block size):
#                                     # 2b and 8b vs auto-round and auto-round low_gpu_mem_usage, 2b warm ~8 min
#   bash tests/bench/gpu_scale.sh e   # SmolLM2-135M real weights, whole model, default recipe, ours vs
#                                     # auto-round (tests/bench/accuracy.py; SMOL_GGUF, SMOL_DATA); CUDA kernel
#                                     # tests; per-layer row switch; decode/prefill of Qwen2-1.5B; the 8-block
#                                     # 8B-shaped checkpoint for part f                                ~8 min
#   bash tests/bench/gpu_scale.sh f   # issue 16: that checkpoint quantized in RAM (RSS vs the planner) and
#                                     # streamed; 70b vs auto-round                                       ~7 min
#   bash tests/bench/gpu_scale.sh g   # what the 2026-12-02 second run left to check: SmolLM2 block dims with the
#                                     # sync check no longer gating graphs (vs auto-round), the SmolLM2 real-weights
#                                     # whole model (SMOL_GGUF, SMOL_DATA), the per-layer row switch after the
#                                     # dequant indexing fix, decode/prefill of Qwen2-1.5B                ~8 min
#   bash tests/bench/gpu_scale.sh h   # issue 16's in-RAM run with the RSS timeline (builds the 8-block checkpoint),
#                                     # 70b with the block compile default (vs auto-round)               ~8 min
#   bash tests/bench/gpu_scale.sh i   # low_gpu_mem_usage at 2b (ours, now with sub-batches, vs auto-round's), then
#                                     # part g without the SmolLM2 whole model                         ~7 min
#   bash tests/bench/gpu_scale.sh j   # the SmolLM2 real-weights whole model alone (SMOL_GGUF, SMOL_DATA) ~5 min
#   bash tests/bench/gpu_scale.sh k   # CUDA kernel tests (compiled forward too), per-layer GEMMs with the coalesced
#                                     # dequantization, decode/prefill of Qwen2-1.5B eager and with a static cache and
#                                     # compiled decode step (bf16, ours, auto-round)                  ~6 min
#   bash tests/bench/gpu_scale.sh l   # 2b vs auto-round, 2b again (warm compile caches), 2b with CUDA graphs over the
#                                     # compiled block; decode/prefill of Llama-3-8B shape             ~7.5 min
#   bash tests/bench/gpu_scale.sh m   # the many-rows dequantization in each layout and compile mode per layer; decode/prefill
#                                     # of Qwen2-1.5B, the static-cache paths first (recompiles logged)   ~8 min
#   bash tests/bench/gpu_scale.sh n   # 2b cold and warm with the per-phase times of each block (where the first block's
#                                     # overhead goes); issue 16's in-RAM 8-block 8B run after the sliced finite check ~7 min
#   bash tests/bench/gpu_scale.sh n2  # n's issue 16 steps alone, with room for the checkpoint build      ~5 min
#   bash tests/bench/gpu_scale.sh o   # decode/prefill of the Llama-3-8B shape, eager: bf16 / ours / auto-round ~3 min
#   bash tests/bench/gpu_scale.sh p   # a cProfile of a cold 2b run (the first block); Qwen2-1.5B prefill, eager and
#                                     # the whole forward compiled, bf16 / ours                       ~5 min
#   bash tests/bench/gpu_scale.sh q   # Llama-3-8B shape: static-cache compiled decode at batch 1, ours / bf16 ~5.5 min
#   bash tests/bench/gpu_scale.sh r   # 2b and 8b vs auto-round after the on-device finite check      ~7.5 min
#   bash tests/bench/gpu_scale.sh t   # the Qwen2-VL-2B-shaped vision towers at 200 iterations           ~4 min
#   bash tests/bench/gpu_scale.sh u   # Qwen2-1.5B prefill, eager and compiled, with the coalesced Wᵀ dequantization ~5 min
#   bash tests/bench/gpu_scale.sh s   # Llama-3-8B shape: static decode at batch 8 and the compiled prefill ~9.5 min
#   bash tests/bench/gpu_scale.sh v   # issue 13: step floor (ours vs a plain training step of the block, fused vs
#                                     # unfused layer step, kernel classes) at 2b and 8b; 2b vs auto-round ~6 min
#   bash tests/bench/gpu_scale.sh w   # issue 13: the compiled qdq kernels per layer shape under three shape markings;
#                                     # 2b ours alone, cold then in a second process (warm caches, bytecode) ~5 min
#   bash tests/bench/gpu_scale.sh x   # issue 13: step floor at 2b and 8b with the gradient layouts the layer step gets
#                                     # (and a contiguous copy of them); 8b vs auto-round              ~7 min
#   bash tests/bench/gpu_scale.sh y   # 70b vs auto-round after the fused layer step; the vision towers at 200 iterations ~9 min
#   bash tests/bench/gpu_scale.sh z   # 2b ours alone, cold then warm (measured a compile warm-up thread, since reverted) ~3 min
#   bash tests/bench/gpu_scale.sh tiny  # a dry run on a CPU (no wheels; uses $PYTHON, default python3)
#
# On the device machine: carry `.whl` (orjson, auto-round 0.16.1 and the auto-round needs the image lacks)
# and name the commit, e.g. SIGNROUND_COMMIT=<hash> bash tests/bench/gpu_scale.sh a
# Environment: OUT (default /tmp/gpu_scale-out), BENCH_ARGS (added to every bench call), PYTHON.
#
# Written to $OUT: gpu_scale-PART.log (everything printed), performance-PART.json (the spec/performance.json
# records of this part's bench runs) and raw-PART.tgz (every JSON, profile table and memory snapshot).
# Each run has its own timeout so that one stuck run leaves the others' numbers.
set -uo pipefail

PART=${1:?usage: bash tests/bench/gpu_scale.sh a|b|...|n|n2|o|p|q|r|s|t|u|v|w|x|y|z|tiny}
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
# The image's site-packages hold no usable bytecode (9.1 s of a first block went to compiling torch's own
# source, 2026-12-02e); a pip install writes it, so a second process here gets it from this prefix, as on a user's machine.
export PYTHONPYCACHEPREFIX=/tmp/pycache
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
RAW=$OUT/raw
mkdir -p "$RAW"
run() {  # run NAME SIZE SECONDS [extra bench flags...]; env assignments before `run` apply to it
  local name=$1 size=$2 limit=$3
  shift 3
  echo "== $name: bench --dims $size $* (limit ${limit}s)  $(date -u +%T)" | tee -a "$LOG"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  (cd /tmp && timeout --kill-after=15 "$limit" "$PY" -m signround bench --dims "$size" \
      --json "$RAW/bench-$name.json" "$@" ${BENCH_ARGS:-}) 2>&1 | grep -v '^RESULT ' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { FAILED+=("$name (exit $rc)"); echo "== $name FAILED: exit $rc" | tee -a "$LOG"; }
}
step() {  # step NAME SECONDS command...: any other measurement, its output in the log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* (limit ${limit}s)  $(date -u +%T)" | tee -a "$LOG"
  (cd /tmp && timeout --kill-after=15 "$limit" "$@") 2>&1 | tail -n 60 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { FAILED+=("$name (exit $rc)"); echo "== $name FAILED: exit $rc" | tee -a "$LOG"; }
}
# SmolLM2-135M's block dimensions (the issue's whole-model row: 30 such blocks; 6 measured), its calibration
# shape in spec/accuracy.md (128 x 512, batch 8, G64).
SMOL=(--layers 6 --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 --vocab 49152 --model-type llama
      --seqlen 512 --group-size 64)

case $PART in
  a) run 2b 2b 200
     run 2b-warm 2b 90 --no-reference          # first-block overhead with the compile caches warm
     SIGNROUND_COMPILE_BLOCK=1 run 2b-cblock-cold 2b 120 --no-reference
     SIGNROUND_COMPILE_BLOCK=1 run 2b-cblock-warm 2b 90 --no-reference
     run smol 2b 170 "${SMOL[@]}" --profile "$RAW/prof-smol" ;;
  b) run 8b 8b 240 --profile "$RAW/prof-8b"
     run 70b 70b 330 ;;
  c) S=$REPO/tests/bench/stream_gpu.py
     step stream-build 120 "$PY" "$S" build --dir /tmp/m8b --layers 8
     step stream-ram 120 "$PY" "$S" ram --dir /tmp/m8b --out "$RAW" --layers 8
     step stream-stream 120 "$PY" "$S" stream --dir /tmp/m8b --out "$RAW" --layers 8
     step stream-compare 60 "$PY" "$S" compare --dir /tmp/m8b --out "$RAW"
     step stream-plan70b 60 "$PY" "$S" plan70b --out "$RAW"
     rm -rf "$RAW/q-ram" "$RAW/q-stream" "$RAW/calib.txt"
     step kernels-cuda 60 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/checkpoint/test_kernels.py" -k cuda
     step decode-qwen2 150 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16,ours,ours:dequant,ours:dequant-cached,auto-round --json "$RAW/decode-qwen2-1.5b.json"
     step decode-layers 90 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096 --layer-rows 1,8,64,512,2048 --repeats 20 \
       --json "$RAW/layers-cuda.json" ;;
  d) run 2b 2b 220 --reference-low-mem
     run 2b-warm 2b 90 --no-reference          # first-block overhead with the compile caches warm
     run 8b 8b 300 --reference-low-mem ;;
  e) A=$REPO/tests/bench/accuracy.py
     step smol-accuracy 330 "$PY" "$A" --model "${SMOL_GGUF:?SMOL_GGUF: the SmolLM2 GGUF}" \
       --calib "${SMOL_DATA:?SMOL_DATA: a folder with news-calib.jsonl and wiki-eval.txt}/news-calib.jsonl" \
       --eval "$SMOL_DATA/wiki-eval.txt" --device cuda --recipe default --seqlen 512 --eval-windows 40 \
       --eval-seqlen 2048 --configs W4G64 --methods rtn,signround,auto-round --seed 42 --json "$RAW/smol-accuracy.json"
     step kernels-cuda 90 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/checkpoint/test_kernels.py" -k cuda
     step decode-layers 60 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096 --layer-rows 1,8,16,32,64,512,2048 --repeats 20 \
       --json "$RAW/layers-cuda.json"
     step decode-qwen2 150 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16,ours,auto-round --json "$RAW/decode-qwen2-1.5b.json"
     step stream-build 130 "$PY" "$REPO/tests/bench/stream_gpu.py" build --dir /tmp/m8b --layers 8 ;;
  f) S=$REPO/tests/bench/stream_gpu.py
     [ -d /tmp/m8b ] || step stream-build 300 "$PY" "$S" build --dir /tmp/m8b --layers 8  # 127 s on the 5th run
     step stream-ram 130 "$PY" "$S" ram --dir /tmp/m8b --out "$RAW" --layers 8
     rm -rf "$RAW/q-ram" "$RAW/calib.txt"
     run 70b 70b 330 ;;
  g) run smol 2b 170 "${SMOL[@]}"
     A=$REPO/tests/bench/accuracy.py
     step smol-accuracy 300 "$PY" "$A" --model "${SMOL_GGUF:?SMOL_GGUF: the SmolLM2 GGUF}" \
       --calib "${SMOL_DATA:?SMOL_DATA: a folder with news-calib.jsonl and wiki-eval.txt}/news-calib.jsonl" \
       --eval "$SMOL_DATA/wiki-eval.txt" --device cuda --recipe default --seqlen 512 --eval-windows 40 \
       --eval-seqlen 2048 --configs W4G64 --methods signround,auto-round --seed 42 --json "$RAW/smol-accuracy.json"
     step decode-layers 60 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096 --layer-rows 1,8,16,32,64,128,256,512,2048 \
       --repeats 20 --json "$RAW/layers-cuda.json"
     step decode-qwen2 150 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16,ours,auto-round --json "$RAW/decode-qwen2-1.5b.json" ;;
  h) S=$REPO/tests/bench/stream_gpu.py
     [ -d /tmp/m8b ] || step stream-build 300 "$PY" "$S" build --dir /tmp/m8b --layers 8  # 127 s on the 5th run
     step stream-ram 130 "$PY" "$S" ram --dir /tmp/m8b --out "$RAW" --layers 8
     rm -rf "$RAW/q-ram" "$RAW/calib.txt"
     run 70b 70b 300 ;;
  i) run 2b-lowmem 2b 220 --low-gpu-mem-usage --no-reference --reference-low-mem
     run smol 2b 170 "${SMOL[@]}"
     step decode-layers 60 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096 --layer-rows 1,8,16,32,64,128,256,512,2048 \
       --repeats 20 --json "$RAW/layers-cuda.json"
     step decode-qwen2 150 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16,ours,auto-round --json "$RAW/decode-qwen2-1.5b.json" ;;
  j) step smol-accuracy 330 "$PY" "$REPO/tests/bench/accuracy.py" --model "${SMOL_GGUF:?SMOL_GGUF: the SmolLM2 GGUF}" \
       --calib "${SMOL_DATA:?SMOL_DATA: a folder with news-calib.jsonl and wiki-eval.txt}/news-calib.jsonl" \
       --eval "$SMOL_DATA/wiki-eval.txt" --device cuda --recipe default --seqlen 512 --eval-windows 40 \
       --eval-seqlen 2048 --configs W4G64 --methods signround,auto-round --seed 42 --json "$RAW/smol-accuracy.json" ;;
  k) step kernels-cuda 90 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/checkpoint/test_kernels.py" -k "cuda or compiled"
     step decode-layers 60 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096,4096x14336 --layer-rows 1,8,2048 --repeats 20 \
       --json "$RAW/layers-cuda.json"
     step decode-qwen2 300 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16,bf16+static,ours,ours+static,auto-round,auto-round+static --json "$RAW/decode-qwen2-1.5b.json" ;;
  l) run 2b 2b 170
     run 2b-warm 2b 90 --no-reference
     SIGNROUND_CUDA_GRAPHS=1 run 2b-graphs 2b 90 --no-reference
     step decode-llama8b 220 "$PY" "$REPO/tests/bench/decode_bench.py" --model llama3-8b --device cuda \
       --paths bf16+static,ours+static,ours,auto-round --json "$RAW/decode-llama3-8b.json" ;;
  m) step dequant-variants 90 "$PY" "$REPO/tests/bench/decode_bench.py" --device cuda --group-size 128 --dequant-variants \
       --layers 1536x1536,8960x1536,1536x8960,4096x4096,14336x4096,4096x14336 --layer-rows 1,2048 --repeats 20 \
       --json "$RAW/dequant-variants.json"
     TORCH_LOGS=recompiles step decode-qwen2 400 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths ours+static,bf16+static,ours,bf16,auto-round,auto-round+static --json "$RAW/decode-qwen2-1.5b.json" ;;
  n2) S=$REPO/tests/bench/stream_gpu.py  # n's issue 16 steps alone (the 5th run's n stopped its build at 130 s)
     step stream-build 300 "$PY" "$S" build --dir /tmp/m8b --layers 8
     step stream-ram 250 "$PY" "$S" ram --dir /tmp/m8b --out "$RAW" --layers 8
     rm -rf "$RAW/q-ram" "$RAW/calib.txt" ;;
  n) S=$REPO/tests/bench/stream_gpu.py
     run 2b 2b 170                                   # phases of the first block, cold (printed and in the JSON)
     run 2b-warm 2b 90 --no-reference                # and warm
     [ -d /tmp/m8b ] || step stream-build 300 "$PY" "$S" build --dir /tmp/m8b --layers 8  # 127 s on the 5th run
     step stream-ram 130 "$PY" "$S" ram --dir /tmp/m8b --out "$RAW" --layers 8   # issue 16: RSS after the sliced finite check
     rm -rf "$RAW/q-ram" "$RAW/calib.txt" ;;
  p) # issue 13: where the first block's non-compile time goes (cProfile of a cold 2b run, ours only);
     # issue 18: the whole forward compiled for prefill, Qwen2-1.5B shape (decode not repeated)
     step first-block-profile 230 "$PY" -m cProfile -o "$RAW/first-block.pstats" -m signround bench --dims 2b \
       --no-reference --json "$RAW/bench-2b-profiled.json"
     step first-block-pstats 60 "$PY" -c "import pstats, sys; s = pstats.Stats(sys.argv[1], stream=open(sys.argv[2], 'w')); \
s.sort_stats('cumulative').print_stats(150); s.sort_stats('tottime').print_stats(80); \
s.print_callers('cudaHostAlloc|pin_memory|empty_cache|synchronize')" "$RAW/first-block.pstats" "$RAW/first-block-pstats.txt"
     step decode-qwen2-prefill 260 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths bf16+static,ours+static --batches "" --json "$RAW/decode-qwen2-prefill.json" ;;
  q) # issue 18: 8B, static decode at batch 1 and the compiled prefill (ours first: the row that matters)
     step decode-llama8b-static 560 "$PY" "$REPO/tests/bench/decode_bench.py" --model llama3-8b --device cuda \
       --paths ours+static,bf16+static --batches 1 --prefill 0 --json "$RAW/decode-llama3-8b-static.json" ;;
  r) # issue 13: 2b and 8b after the on-device finite check (predicted: targets phase 0.25 -> ~0.08 s a block at 2b,
     # ~0.5 s less a block at 8b)
     run 2b 2b 170
     run 8b 8b 260 ;;
  t) # issue 15: the vision towers at the default 200 iterations (20 iterations took 40.6 s in all)
     step vision-200 280 "$PY" "$REPO/tests/bench/vision_speed.py" --iters 200 --nsamples 16 --json "$RAW/vision-200.json" ;;
  s) # issue 18: 8B static decode at batch 8 and the compiled prefill (each path's compiles take ~100-150 s)
     step decode-llama8b-static-b8 560 "$PY" "$REPO/tests/bench/decode_bench.py" --model llama3-8b --device cuda \
       --paths ours+static,bf16+static --batches 8 --json "$RAW/decode-llama3-8b-static-b8.json" ;;
  u) # issue 18: the coalesced Wᵀ dequantization (bench-only --wide-layout cols) in eager and whole-graph-compiled
     # prefill, Qwen2-1.5B shape; against part p's rows layout (ours 31041 eager, 78571 compiled; bf16 128980 compiled)
     step decode-qwen2-prefill-cols 300 "$PY" "$REPO/tests/bench/decode_bench.py" --model qwen2-1.5b --device cuda \
       --paths ours+static,bf16+static --batches "" --wide-layout cols --json "$RAW/decode-qwen2-prefill-cols.json" ;;
  o) # the eager rows (the static ones are part q; their compiles alone take ~100 s a path at 8B)
     step decode-llama8b 240 "$PY" "$REPO/tests/bench/decode_bench.py" --model llama3-8b --device cuda --repeats 2 \
       --paths ours,bf16,auto-round --json "$RAW/decode-llama3-8b.json" ;;
  v) F=$REPO/tests/bench/step_floor.py
     step floor-2b 120 "$PY" "$F" --dims 2b --profile "$RAW/prof-2b-steps" --json "$RAW/floor-2b.json"
     step floor-8b 200 "$PY" "$F" --dims 8b --profile "$RAW/prof-8b-steps" --json "$RAW/floor-8b.json"
     run 2b 2b 170 ;;
  w) step qdq-kernels 170 "$PY" "$REPO/tests/bench/qdq_kernels.py" --json "$RAW/qdq-kernels.json" --code-dir "$RAW/qdq-code"
     run 2b-cold 2b 100 --no-reference
     run 2b-warm 2b 100 --no-reference ;;
  x) F=$REPO/tests/bench/step_floor.py
     step floor-2b 110 "$PY" "$F" --dims 2b --engine-iters 0 --json "$RAW/floor-2b.json"
     step floor-8b 150 "$PY" "$F" --dims 8b --engine-iters 0 --profile "$RAW/prof-8b-steps" --json "$RAW/floor-8b.json"
     run 8b 8b 260 ;;
  y) run 70b 70b 300
     step vision-200 250 "$PY" "$REPO/tests/bench/vision_speed.py" --iters 200 --nsamples 16 --json "$RAW/vision-200.json" ;;
  z) run 2b-cold 2b 100 --no-reference
     run 2b-warm 2b 100 --no-reference ;;
  tiny) run tiny tiny 300 --device cpu --profile "$RAW/prof-tiny"
        S=$REPO/tests/bench/stream_gpu.py
        step stream-build 120 "$PY" "$S" build --dir /tmp/m-tiny --layers 2 --tiny
        step stream-stream 120 "$PY" "$S" stream --dir /tmp/m-tiny --out "$RAW" --layers 2 --tiny --device cpu --iters 2 ;;
  *) echo "unknown part $PART (a to z, n2, or tiny)" >&2; exit 2 ;;
esac

# The table last: one row per size, and this part's spec/performance.json records.
"$PY" - "$OUT" "$PART" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out, part = Path(sys.argv[1]), sys.argv[2]
order = {"2b": 0, "8b": 1, "70b": 2}
rows = sorted(((p.stem[6:], json.loads(p.read_text())) for p in (out / "raw").glob("bench-*.json")),
              key=lambda nr: (order.get(nr[1]["dims"], 9), nr[0]))
f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
g = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
print(f"{'run':15}{'ours s':>8}{'ref s':>8}{'speedup':>8}{'ours+1st':>9}{'ref+1st':>8}{'ours GiB':>9}{'ref GiB':>8}"
      f"{'ratio':>6}{'ours net':>9}{'ref net':>8}{'model':>7}{'loss':>7}  ref_low_mem s / GiB")
records = {}
for name, r in rows:
    s, a, lm = r["signround"], r.get("auto_round") or {}, r.get("auto_round_low_mem") or {}
    records[name] = r["summary"]
    low = f"{f(lm.get('steady_seconds_per_block'))} / {g(lm.get('peak_memory_bytes'))}" if lm else "-"
    if "error" in a:
        low += f"   auto-round: {a['error'][:80]}"
    print(f"{name:15}{f(s['steady_seconds_per_block']):>8}{f(a.get('steady_seconds_per_block')):>8}"
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

# Everything measured travels back as one archive (the device tool returns at most eight files).
tar czf "$OUT/raw-$PART.tgz" -C "$RAW" . && rm -rf "$RAW"

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "== failed: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "== part $PART done  $(date -u +%T)" | tee -a "$LOG"
