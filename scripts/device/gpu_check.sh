#!/usr/bin/env bash
# The ONE script a GPU session runs (see the device tool's README): installs the carried wheels,
# runs the GPU tests (bf16/NCCL training, TE-vs-local when TE exists), then the training
# benchmark (ours vs plain PyTorch, eager and compiled) on the ~1B model.  Everything it
# measures lands in $OUT; the table prints last.
#
#   device run, carry [".whl"]:  bash scripts/device/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PLT_TRAIN_CACHE=/tmp/plt_cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__)" \
    | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== training benchmark (~1B, bf16)"
timeout 300 python3 scripts/bench_train.py --steps 10 --warmup 3 \
    --out "$OUT/bench_train.json" --plot "$OUT/bench_train.png" 2>&1 | tee "$OUT/bench_train.log" | tail -25
