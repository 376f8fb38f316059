"""``scripts/bench_moe.py`` end to end at a tiny size (EP 1 in-process, EP 2 under torchrun)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, one_process_env


def test_bench_moe_tiny(tmp_path):
    out, plot = tmp_path / "moe.json", tmp_path / "moe.png"
    cmd = [sys.executable, "scripts/bench_moe.py", "--tiny", "--ep", "1,2", "--topk", "2,4",
           "--out", str(out), "--plot", str(plot)]
    env = one_process_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "projection (paper Table 3 formulas)" in proc.stdout

    records = json.loads(out.read_text())
    measured = [r for r in records if r.get("kind") != "projection"]
    keys = {(r["layer"], r["ep"], r["topk"]) for r in measured}
    assert keys == {(lay, ep, k) for lay in ("fine_grained", "bigmac") for ep in (1, 2)
                    for k in (2, 4)}
    for r in measured:
        assert {"layer", "ep", "topk", "a2a_bytes", "a2a_ms", "layer_ms", "device"} <= set(r)
        assert r["device"].startswith("cpu") and r["layer_ms"] > 0 and r["a2a_ms"] >= 0
        if r["ep"] == 1:
            assert r["a2a_bytes"] == 0 and r["a2a_ms"] == 0
        else:
            assert r["a2a_bytes"] > 0 and r["a2a_ms"] > 0
            # Measured vs the paper's formula for this shape (balanced-routing expectation).
            assert 0.7 < r["bytes_vs_formula"] < 1.3
    by = {(r["layer"], r["ep"], r["topk"]): r for r in measured}
    for k in (2, 4):  # same tokens and the same router draw: exactly r = 1/4 of the bytes
        assert by[("bigmac", 2, k)]["a2a_bytes"] * 4 == by[("fine_grained", 2, k)]["a2a_bytes"]
        assert by[("fine_grained", 2, 4)]["a2a_bytes"] > by[("fine_grained", 2, 2)]["a2a_bytes"]

    proj = [r for r in records if r.get("kind") == "projection"]
    assert {(r["model"], r["layer"], r["topk"]) for r in proj} == {
        (m, lay, k) for m in ("GPT3-XL", "GPT3-6.7B") for lay in ("fine_grained", "bigmac")
        for k in (2, 4)}
    for r in proj:
        if r["layer"] == "bigmac":
            assert r["speedup_vs_fine_grained"] > 1
    assert plot.exists() and plot.stat().st_size > 0
