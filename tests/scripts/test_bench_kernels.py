"""``scripts/bench_kernels.py --small`` (CPU: Triton interpreter) checks every kernel and
writes the timing records, JSON and plot a GPU session will fill at full size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_bench_kernels_small_checks_every_kernel_and_writes_records(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--small", "--strict",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert (tmp_path / "bench_kernels.png").stat().st_size > 1000
    checks = {r["section"]: r for r in records if r["variant"] == "check"}
    assert set(checks) == {"gswa", "dcca", "decode"}
    assert all(r["ok"] and r["max_rel_err"] <= r["tol"] for r in checks.values())
    timed = {(r["section"], r["variant"]) for r in records if "ms" in r}
    assert {("gswa", "sdpa_causal"), ("gswa", "gswa_naive"), ("gswa", "gswa_fused")} <= timed
    assert all(r["ms"] > 0 and r["vs_baseline"] > 0 for r in records if "ms" in r)
    lines = proc.stdout.splitlines()  # the table comes last: its header, then one row each
    header = max(i for i, line in enumerate(lines) if line.startswith("section "))
    assert len(lines) - header - 1 == sum("ms" in r or "max_rel_err" in r for r in records)
