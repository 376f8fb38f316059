#!/usr/bin/env bash
# The ONE script a GPU session runs (see the device tool's README): installs the carried wheels,
# runs the GPU tests (bf16/NCCL training, TE-vs-local when TE exists), then the training
# benchmark (ours vs plain PyTorch, eager and compiled) on the ~1B model.  Everything it
# measures lands in $OUT; the table prints last.
#
#   device run, carry [".whl"]:  bash scripts/device/gpu_check.sh
source "$(dirname "$0")/env.sh"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__)" \
    | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== training benchmark (~1B, bf16)"
timeout 300 python3 scripts/bench_train.py --steps 10 --warmup 3 \
    --out "$OUT/bench_train.json" --plot "$OUT/bench_train.png" 2>&1 | tee "$OUT/bench_train.log" | tail -25

# BigMac's quality at GPU size (equal tokens, one seed; on one GPU the experts are not split,
# so the all-to-all is local: equal wall time needs the emulated network of
# scripts/bench_cluster.py and is a CPU measurement).  r*h = 256; ~6.5M tokens per variant.
echo "== MoE quality at GPU size: dense vs fine_grained vs bigmac (compare_moe --preset gpu)"
timeout 330 python3 scripts/compare_moe.py --preset gpu --nproc 1 --seeds 1 --steps 200 \
    --eval-interval 25 --out-dir "$OUT/compare_moe_gpu" 2>&1 | tail -8
