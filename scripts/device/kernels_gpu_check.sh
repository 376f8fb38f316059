#!/usr/bin/env bash
# The kernel checks for a GPU session (issue 5), about 8 minutes:
#   device run, carry [".whl"]:  bash scripts/device/kernels_gpu_check.sh
#  1. tests/kernels compiled on CUDA (bf16 cases included; on CPU they ran in the interpreter)
#     and the generator tests, whose CUDA-graph capture tests skip on CPU; the MoE wire
#     formats' casts (fp8/bf16 all-to-all payloads) on CUDA.
#  2. scripts/bench_kernels.py at the issue's shapes, bf16: full-size checks, then G-SWA vs
#     SDPA/Flex, DCCA vs megatron's permute/unpermute, the BigMac and fine-grained layers vs
#     the expert GEMMs, the decode attention launch vs the reference; and every compiled
#     kernel's registers/spills from the driver (compiled_resources.json), to set against
#     docs/results/kernel_resources_sm90.json (found on CPU).
#  3. scripts/bench_decode.py at the PLT issue's shape (16 layers, d=2048, prompt 1024),
#     eager vs CUDA graph, decode attention torch vs triton: the end-to-end re-run.
source "$(dirname "$0")/env.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"

echo "== 1. kernel tests on CUDA, and CUDA-graph decode capture"
timeout 150 python3 -m pytest tests/kernels tests/inference/test_generator.py \
    tests/models/test_moe_wire.py -q \
    -p no:cacheprovider 2>&1 \
    | tee "$OUT/kernel_tests.log" | tail -15

echo "== 2. bench_kernels (bf16, issue shapes)"
timeout 200 python3 scripts/bench_kernels.py --out "$OUT/bench_kernels" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench_kernels.log" | tail -30

echo "== 3. bench_decode: eager vs CUDA graph, decode attention torch vs triton"
timeout 200 python3 scripts/bench_decode.py --layers 16 --hidden 2048 --heads 16 --groups 4 \
    --vocab 32768 --new 64 --cuda-graph off on --kernel torch triton \
    --out "$OUT/bench_decode" 2>&1 | grep -v -i warn | tee "$OUT/bench_decode.log" | tail -30
