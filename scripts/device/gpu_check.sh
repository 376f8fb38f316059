#!/usr/bin/env bash
# The ONE script a GPU session runs, in one device call (a session has 15 minutes of device
# time, the machine's start included).  Carry [".whl"] (scripts/device/fetch_wheels.sh),
# timeout_s 600:
#
#   bash scripts/device/gpu_check.sh                 # BUDGET_S=550 seconds of work by default
#   STAGES="train_dense kernels" bash scripts/device/gpu_check.sh   # a subset, same order
#   DRY_RUN=1 bash scripts/device/gpu_check.sh       # CPU: list the stages' commands (the test)
#
# Stages, in the order of what users compare first; each under its own cap and the overall
# budget (a stage that no longer fits is skipped and said so), its log and JSON in $W, packed
# into $OUT/results.tgz as it ends, so a call cut short still returns what finished.  The
# summary prints last, with the targets of the training-at-scale issue beside the numbers.
#  peak: the bf16 matmul peak of this card, measured (the MFU denominator below).
#  train_dense: the 1b shape (bf16, micro-batch 4): ours (dense) vs the plain PyTorch GPT,
#     eager and compiled, in one process (target: ours >= 1.0x the compiled plain GPT).
#  train_plt_*: PLT-2 over 8 layers of the 1b shape (kernels auto): eager, compiled layers
#     (model.compile), full recompute (target: >= 55 % of the measured peak).
#  train_bigmac_*: BigMac over 4 layers (64 experts, top-8, r = 0.25) at EP=1: eager, compiled
#     (target: >= 40 %).
#  gpu_tests: the GPU-only tests, the kernel tests compiled on CUDA, the generator's CUDA-graph
#     capture, the MoE wire casts, compiled layers on CUDA.
#  compile_breaks: scripts/bench_compile.py on CUDA (graph breaks with the bf16 grouped GEMM
#     and the real Triton kernels; compiled vs eager at a small shape).
#  kernels: bench_kernels.py at the issues' shapes (G-SWA, DCCA, decode attention), then the
#     profile of where their time goes, then the G-SWA tile sweep.
#  decode: bench_decode.py at the PLT issue's shape: eager vs CUDA graph, torch vs Triton.
#  quality_moe: dense vs fine-grained vs BigMac at GPU size (compare_moe.py --preset gpu).
#  quality_plt: the CPU's key-value recall comparison at 3x its steps, where the looped models
#               may catch up (plt_quality.py task; records are saved as each run ends).
#  quality_plt_lm: language modelling at the GPU size (plt_quality.py lm --preset gpu: a block
#               of 6 layers of d=768, vanilla-2L 12), one seed, the decode latency beside it.
#               Too long to follow the rest in one call: it runs only when STAGES names
#               it, as its own call: STAGES=quality_plt_lm BUDGET_S=570 bash ...gpu_check.sh
source "$(dirname "$0")/env.sh"
W=${W:-/tmp/gpu_check}
mkdir -p "$W"
[[ -f "$OUT/gpu.txt" ]] && cp "$OUT/gpu.txt" "$W/"
END=$((SECONDS + ${BUDGET_S:-550}))
: > "$W/summary.txt"

pack() {
  tar czf "$OUT/results.tgz.part" -C "$W" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

want() {  # is stage $1 among $STAGES (all when unset)?
  [[ -z "${STAGES:-}" || " $STAGES " == *" $1 "* ]]
}

stage() {  # name cap-seconds command...: runs it into $W/name.log unless the budget is spent
  local name=$1 cap=$2; shift 2
  want "$name" || want "${name%%_*}" || return 0
  if [[ -n "${DRY_RUN:-}" ]]; then  # one command per line, its words tab-separated
    (IFS=$'\t'; echo "$name	$*") >> "$W/commands.tsv"; return 0
  fi
  local left=$((END - SECONDS - 10))
  if (( left < 30 )); then
    echo "$name: skipped, ${left}s of the budget left" | tee -a "$W/summary.txt"; return 0
  fi
  (( cap > left )) && cap=$left
  echo "== $name (cap ${cap}s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$cap" "$@" >"$W/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0))s (cap ${cap}s)" | tee -a "$W/summary.txt"
  pack
}

[[ -n "${DRY_RUN:-}" ]] && : > "$W/commands.tsv"
peak_args() {  # --peak-tflops of the measured peak, once the peak stage has written it
  [[ -s "$W/peak.json" ]] && python3 -c "import json,sys; print('--peak-tflops', \
json.load(open(sys.argv[1]))[0]['tflops'])" "$W/peak.json"
}
train() {  # name layers sets...: bench_train.py, ours only, one model variant
  local name=$1 layers=$2; shift 2
  # shellcheck disable=SC2046  # peak_args is two words or none
  stage "$name" 100 python3 scripts/bench_train.py --which ours --layers "$layers" \
      --steps 15 --warmup 3 $(peak_args) --out "$W/$name.json" --set "$@"
}

stage peak 40 python3 scripts/device/matmul_peak.py --out "$W/peak.json"
# shellcheck disable=SC2046
stage train_dense 200 python3 scripts/bench_train.py --which ours,plain_eager,plain_compiled \
    --steps 10 --warmup 3 $(peak_args) --out "$W/train_dense.json" --plot "$W/train_dense.png"
PLT=(name=plt loops=2)
BIGMAC=(moe.layer=bigmac moe.num_experts=64 moe.top_k=8 moe.ratio=0.25)
train train_plt_eager 8 "${PLT[@]}"
train train_plt_compiled 8 "${PLT[@]}" compile=true
train train_plt_recompute 8 "${PLT[@]}" recompute.granularity=full
train train_bigmac_eager 4 "${BIGMAC[@]}"
train train_bigmac_compiled 4 "${BIGMAC[@]}" compile=true
stage gpu_tests 120 python3 -m pytest tests/gpu tests/kernels tests/inference/test_generator.py \
    tests/models/test_moe_wire.py tests/models/test_compile.py -q -rfE \
    --deselect tests/kernels/test_compile_for_hopper.py
stage compile_breaks 120 python3 scripts/bench_compile.py --out "$W/bench_compile.json" \
    --plot "$W/bench_compile.png"
stage kernels_bench 210 python3 scripts/bench_kernels.py --only gswa,dcca,decode \
    --out "$W/bench_kernels"
stage kernels_profile 90 python3 scripts/bench_kernels.py --only profile --warmup 3 --iters 5 \
    --out "$W/profile"
stage kernels_tiles 90 python3 scripts/bench_kernels.py --only gswa_tiles --out "$W/gswa_tiles"
stage decode 150 python3 scripts/bench_decode.py --layers 16 --hidden 2048 --heads 16 \
    --groups 4 --vocab 32768 --new 64 --cuda-graph off on --kernel torch triton \
    --out "$W/bench_decode"
stage quality_moe 330 python3 scripts/compare_moe.py --preset gpu --nproc 1 --seeds 1 \
    --steps 200 --eval-interval 25 --out-dir "$W/compare_moe_gpu"
stage quality_plt 330 python3 scripts/plt_quality.py task --kind recall --steps 10000 \
    --eval-every 1000 --models vanilla-L vanilla-2L looped-2-raw plt-2-hs0.02 plt-2-raw clp-2-hs \
    --seeds 1 --jobs 6 --out "$W/plt_quality" --json "$W/plt_quality.json"
if [[ " ${STAGES:-} " == *" quality_plt_lm "* ]]; then  # named only: its own call
  stage quality_plt_lm 560 python3 scripts/plt_quality.py lm --preset gpu --steps 1000 \
      --models vanilla-L looped-2-raw plt-2-raw vanilla-2L plt-2-hs0.02 --out "$W/plt_quality_lm" \
      --json "$W/plt_quality.json"
fi
[[ -n "${DRY_RUN:-}" ]] && { cat "$W/commands.tsv"; exit 0; }

echo; echo "===== summary ($(head -2 "$W/gpu.txt" 2>/dev/null | tail -1))"
cat "$W/summary.txt"
python3 scripts/device/summarize.py "$W"
pack
