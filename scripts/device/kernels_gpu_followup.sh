#!/usr/bin/env bash
# Issue 5's second device call, after kernels_gpu_check.sh, about 5 minutes (carry [".whl"]):
#   bash scripts/device/kernels_gpu_followup.sh
# The end-to-end re-run of training with the kernels off and on, then the G-SWA tile sweep.
#  1. PLT-2 on 8 layers of the 1b shape (d=2048, seq 2048, micro-batch 4), bf16:
#     model.loop.kernel torch (SDPA + the reference G-SWA) vs triton (the fused G-SWA).
#  2. GPT with BigMac layers on 4 layers of the 1b shape (64 experts, top-8, r=0.25, capacity
#     1.2; EP=1 on one GPU): model.moe.dcca_kernel torch vs triton.
#  3. bench_kernels.py --only gswa_tiles: G-SWA forward/backward tiles at the issue's shape,
#     each checked against the default tiling; the best goes into kernels/gswa.py's _blocks.
# Each training run is its own process (bench_train.py --which ours); compare a pair's ms/step.
source "$(dirname "$0")/env.sh"

run() {  # name kernel-key value extra-sets...
  local name=$1 key=$2 value=$3; shift 3
  echo "== $name: $key=$value"
  timeout 90 python3 scripts/bench_train.py --which ours --layers "$LAYERS" --steps 10 \
      --warmup 3 --out "$OUT/train_${name}_${value}.json" --set "$key=$value" "$@" 2>&1 \
      | grep -v -i warn | tee "$OUT/train_${name}_${value}.log" | tail -6
}

LAYERS=8
for k in torch triton; do run plt loop.kernel "$k" name=plt loops=2; done
LAYERS=4
for k in torch triton; do run bigmac moe.dcca_kernel "$k" moe.layer=bigmac; done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("plt", "bigmac"):
    ms = {}
    for k in ("torch", "triton"):
        f = out / f"train_{name}_{k}.json"
        rec = json.loads(f.read_text())[0] if f.exists() else {}
        ms[k] = rec.get("ms_per_step")
        print(f"{name:7} kernel={k:7} ms/step={ms[k]} error={rec.get('error')}")
    if all(ms.values()):
        print(f"{name:7} triton / torch step time: {ms['triton'] / ms['torch']:.3f}")
PY

echo "== 3. G-SWA tile sweep (bf16, B4 H16 S4096 D128 w64)"
timeout 150 python3 scripts/bench_kernels.py --only gswa_tiles --out "$OUT/gswa_tiles" 2>&1 \
    | grep -v -i warn | tee "$OUT/gswa_tiles.log" | tail -18
