"""The summary of ``scripts/device/gpu_check.sh``: the training numbers against the targets of
the training-at-scale issue, then the tails of the other stages' logs.

    python scripts/device/summarize.py /tmp/gpu_check
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# (stage, what, target): dense tokens/s as a ratio of the compiled plain GPT's; PLT-2 and
# BigMac as a fraction of the measured matmul peak.
DENSE_TARGET = 1.0
MFU_TARGETS = {"train_plt": 0.55, "train_bigmac": 0.40}
LOG_TAILS = {"gpu_tests": ("passed", "failed", "FAILED", "ERROR"),
             "kernels_bench": ("^gswa ", "^dcca ", "^decode ", "failed", "Error"),
             "decode": ("tok/s", "Error"),
             "quality_moe": ("val", "Error"), "quality_plt": ("mean", "Error")}


def records(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def training(w: Path) -> list[str]:
    lines = []
    peak = records(w / "peak.json")
    if peak:
        lines.append(f"measured bf16 matmul peak: {peak[0]['tflops']} TFLOP/s")
    dense = {r["variant"]: r for r in records(w / "train_dense.json") if "tokens_per_s" in r}
    for name, r in dense.items():
        lines.append(f"train_dense {name:15} {r['tokens_per_s']:12,.0f} tokens/s  "
                     f"MFU {100 * r['mfu']:.1f}%")
    if "ours" in dense and "plain_compiled" in dense:
        ratio = dense["ours"]["tokens_per_s"] / dense["plain_compiled"]["tokens_per_s"]
        lines.append(f"  ours / plain compiled = {ratio:.3f} (target >= {DENSE_TARGET})")
    for path in sorted(w.glob("train_*_*.json")):
        stage = path.stem
        if stage == "train_dense":
            continue
        for r in records(path):
            if "mfu" not in r:
                lines.append(f"{stage:24} FAILED {str(r.get('error'))[:200]}")
                continue
            target = MFU_TARGETS.get(stage.rsplit("_", 1)[0])
            lines.append(f"{stage:24} {r['ms_per_step']:9.1f} ms/step {r['tokens_per_s']:12,.0f} "
                         f"tokens/s  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s"
                         + (f" (target >= {100 * target:.0f}%)" if target else ""))
    return lines


def tails(w: Path) -> list[str]:
    import re

    lines = []
    for stage, patterns in LOG_TAILS.items():
        log = w / f"{stage}.log"
        if not log.exists():
            continue
        hits = [line for line in log.read_text(errors="replace").splitlines()
                if any(re.search(p, line) for p in patterns)]
        lines.append(f"----- {stage}")
        lines.extend(hits[-15:])
    return lines


def main(argv=None) -> int:
    w = Path((argv or sys.argv[1:])[0])
    print("\n".join(training(w) + tails(w)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
