#!/usr/bin/env bash
# The MoE checks for a GPU session (device run, carry [".whl"]): bash scripts/device/moe_gpu_check.sh
#  1. GroupedExperts on CUDA: torch._grouped_mm (bf16) against the per-expert loop, fwd + bwd,
#     and their times; fp32 falls back to the loop.
#  2. scripts/bench_moe.py at a GPU shape, EP=1 (one GPU: no all-to-all on the wire).
#  3. GPT + bigmac / fine_grained MoE layers train 8 steps through plt_train.train in bf16.
source "$(dirname "$0")/env.sh"

echo "== 1. experts: grouped GEMM vs loop on CUDA"
timeout 150 python3 - <<'PY' 2>&1 | grep -v -i warn | tee "$OUT/experts.log"
import time, torch
from plt_train.models.transformer_config import to_transformer_config
from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
from plt_train.models.moe.experts import GroupedExperts
from plt_train.runtime import detect_device, init_distributed, set_seed
from plt_train.runtime.device import megatron_device_kwargs
dev = detect_device(); init_distributed(dev); set_seed(0)
def experts(dtype, gemm, E, i, hid):
    tc = to_transformer_config(ModelConfig(moe=MoEConfig(layer="bigmac")), ParallelConfig(), dtype,
                               megatron_device_kwargs(dev))
    return GroupedExperts(E, tc, input_size=i, hidden_size=hid, gemm=gemm).to(dev.device)
for dtype in (torch.bfloat16, torch.float32):
    for (E, i, hid, T) in ((8, 64, 128, 300), (64, 2048, 512, 65536), (64, 512, 2048, 65536)):
        a = experts(dtype, "auto", E, i, hid); b = experts(dtype, "loop", E, i, hid)
        b.load_state_dict(a.state_dict())
        counts = torch.multinomial(torch.ones(E), T, replacement=True).bincount(minlength=E)
        counts[1] = 0
        x = torch.randn(int(counts.sum()), i, device=dev.device, dtype=dtype)
        g = torch.randn_like(x)
        res = {}
        for name, m in (("auto", a), ("loop", b)):
            for it in range(4):
                xi = x.clone().requires_grad_(True); m.zero_grad()
                torch.cuda.synchronize(); t0 = time.perf_counter()
                out, _ = m(xi, counts.cpu()); out.backward(g)
                torch.cuda.synchronize(); dt = time.perf_counter() - t0
            res[name] = (out.float(), xi.grad.float(), m.linear_fc1.weight.grad.float(), dt)
        rel = lambda u, v: ((u - v).norm() / v.norm()).item()
        print(f"{str(dtype):15} E={E:3} in={i:5} hid={hid:5} T={int(counts.sum()):6} "
              f"grouped={a.use_grouped(x)} out_rel={rel(res['auto'][0], res['loop'][0]):.2e} "
              f"dx_rel={rel(res['auto'][1], res['loop'][1]):.2e} dw1_rel={rel(res['auto'][2], res['loop'][2]):.2e} "
              f"auto {1e3*res['auto'][3]:.2f} ms loop {1e3*res['loop'][3]:.2f} ms (fwd+bwd)")
PY

echo "== 2. bench_moe at a GPU shape (EP=1)"
timeout 200 python3 scripts/bench_moe.py --ep 1 --hidden 2048 --experts 64 --tokens 16384 \
    --iters 10 --warmup 3 --out "$OUT/bench_moe_gpu.json" --plot "$OUT/bench_moe_gpu.png" \
    2>&1 | grep -v -i warn | tail -25 | tee "$OUT/bench_moe_gpu.log"

echo "== 3. GPT + MoE layers train in bf16"
for layer in fine_grained bigmac; do
  timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m plt_train.train \
      experiment=debug logging.wandb=false train.eval_interval=0 checkpoint.save_at_end=false \
      train.steps=8 moe=$layer model.moe.num_experts=8 model.moe.top_k=2 run_dir=/tmp/run_$layer \
      2>&1 | grep -E "^step|Error|error" | tail -4 | tee -a "$OUT/train.log"
done
