"""The bf16 matmul peak of this GPU, measured: the denominator of the training issue's MFU
targets ("% of the measured matmul peak"), since no dense model reaches the datasheet's.

    python scripts/device/matmul_peak.py --out peak.json      # ~10 s on an H100/H200

The median of ``--iters`` timed [n, n] x [n, n] bf16 GEMMs (after a warm-up), n = 8192 by
default; writes a list of one record (tflops, n, dtype, device, date)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="matmul_peak.json")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("matmul_peak: no CUDA device", file=sys.stderr)
        return 1
    a, b = (torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tflops = 2 * args.n ** 3 / statistics.median(times) / 1e12
    record = dict(tflops=round(tflops, 1), n=args.n, dtype="bf16",
                  device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
    Path(args.out).write_text(json.dumps([record], indent=1))
    print(f"matmul peak {tflops:.1f} TFLOP/s (bf16, {args.n}^3, median of {args.iters}) on "
          f"{record['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
