#!/usr/bin/env bash
# The PLT checks for a GPU session (device run, carry [".whl"]): bash scripts/device/plt_gpu_check.sh
#  1. One-pass PLT decoding vs the full forward on CUDA (fp32 and bf16), R = 1..3.
#  2. scripts/bench_decode.py at the issue's shape (16 layers, d=2048, prompt 1024, 128 new
#     tokens, batch 1 and 32), bf16, eager (no CUDA graphs yet: that is the kernels issue).
source "$(dirname "$0")/env.sh"

echo "== 1. decode == full forward on CUDA"
timeout 120 python3 - <<'PY' 2>&1 | grep -v -i warn | tee "$OUT/decode_check.log"
import torch
from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
from plt_train.inference import Generator
from plt_train.models import build_model
from plt_train.runtime import detect_device, init_distributed
from plt_train.runtime.device import megatron_device_kwargs
dev = detect_device(); init_distributed(dev)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (5, 9, 1)]
for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
    for name, R in (("vanilla", 1), ("looped", 2), ("plt", 2), ("plt", 3)):
        m = ModelConfig(name=name, loops=R, num_layers=2, hidden_size=64, num_attention_heads=4,
                        num_query_groups=2, seq_length=64, init_method_std=0.1, loop=LoopConfig(window=4))
        model = build_model(m, ParallelConfig(), 100, dtype, megatron_device_kwargs(dev), 11, dev.device)[0][0].eval()
        out = Generator(model).generate(prompts, 12)
        worst = 0.0
        for b, p in enumerate(prompts):
            seq = torch.tensor(p + out.tokens[b], device=dev.device)[None]
            with torch.no_grad():
                full = model(seq, torch.arange(seq.shape[1], device=dev.device)[None], None)[0]
            worst = max(worst, (out.step_logits[b] - full[len(p) - 1:len(p) + 11]).abs().max().item())
        print(f"{str(dtype):15} {name}-{R}: max |decode - full| = {worst:.2e} "
              f"{'OK' if worst < tol else 'FAIL'}")
PY

echo "== 2. bench_decode, issue shape, bf16"
timeout 330 python3 scripts/bench_decode.py --layers 16 --hidden 2048 --heads 16 --groups 4 \
    --vocab 32768 --out "$OUT/bench_decode" 2>&1 | grep -v -i warn | tail -25 | tee "$OUT/bench_decode.log"
