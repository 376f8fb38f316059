"""``scripts/bench_decode.py --tiny`` runs and writes the records the issue asks for."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_bench_decode_tiny_writes_records_and_plot(tmp_path):
    # A fresh process group: not the variables an in-process test left in our environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tiny", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench_decode.json").read_text())
    assert (tmp_path / "bench_decode.png").stat().st_size > 1000
    assert {(r["model"], r["loops"], r["batch"]) for r in records} == {
        (m, R, b) for m, R in [("vanilla", 1), ("looped", 2), ("looped", 3), ("plt", 2),
                               ("plt", 3)] for b in (1, 4)}
    for r in records:
        assert {"model", "loops", "batch", "ms_per_token", "kv_bytes", "device"} <= set(r)
        assert r["ms_per_token"] > 0
        if r["model"] == "plt":  # exactly loop 1's cache plus (R-1) windows
            assert r["kv_vs_vanilla"] == pytest.approx(r["kv_bound"], rel=0, abs=1e-12)
        elif r["model"] == "looped":
            assert r["kv_vs_vanilla"] == r["loops"]
    assert "ms/token" in proc.stdout.splitlines()[-12]  # the table comes last
