"""``scripts/bench_cluster.py --tiny`` end to end on two emulated nodes: calibrated link rates,
records with the promised fields, BigMac's bytes at r x fine-grained's, the same losses on
every link, and the Table 3 projection beside the measured speed-up."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plt_train.runtime.emulated_cluster import unavailable_reason
from tests.helpers import REPO

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no emulated cluster: {REASON}")

FIELDS = {"layer", "ep", "nodes", "topk", "link_mbit", "tokens_per_s", "step_ms", "a2a_ms",
          "a2a_bytes", "a2a_share", "device"}


def test_bench_cluster_tiny(tmp_path, data_cache):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_cluster.py", "--tiny", "--layers", "fine_grained,bigmac",
         "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--plot", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    runs = [r for r in rows if "layer" in r]
    speed = [r for r in rows if r.get("kind") == "speedup"]
    assert png.stat().st_size > 10_000

    # fine_grained and bigmac, unshaped and at one calibrated rate.
    assert len(runs) == 4 and all(FIELDS <= set(r) for r in runs)
    rates = {r["link_mbit"] for r in runs}
    assert None in rates and len(rates) == 2
    by = {(r["layer"], r["link_mbit"]): r for r in runs}
    rate = max(rates - {None})

    for layer in ("fine_grained", "bigmac"):
        # The network changes the time, never the numbers.
        assert by[(layer, rate)]["losses"] == pytest.approx(by[(layer, None)]["losses"],
                                                            rel=1e-5)
        assert by[(layer, rate)]["a2a_bytes"] == pytest.approx(by[(layer, None)]["a2a_bytes"],
                                                               rel=1e-6)
    # BigMac puts r = 0.25 of fine-grained's bytes on the wire (routing nearly identical).
    assert by[("bigmac", rate)]["a2a_bytes"] / by[("fine_grained", rate)]["a2a_bytes"] == \
        pytest.approx(0.25, rel=0.05)
    # The calibrated rate makes fine-grained's all-to-all a large part of its step (target 75 %:
    # about 4x the unshaped step; the bounds are loose, the times are measured on shared cores).
    assert by[("fine_grained", rate)]["a2a_share"] > 0.4
    assert by[("fine_grained", rate)]["step_ms"] > 1.5 * by[("fine_grained", None)]["step_ms"]

    shaped = [s for s in speed if s["link_mbit"] == rate]
    assert len(shaped) == 1 and shaped[0]["projected_table3"] > 1.0
    assert shaped[0]["measured"] == pytest.approx(
        by[("fine_grained", rate)]["step_ms"] / by[("bigmac", rate)]["step_ms"])
    assert "Table 3" in proc.stdout and "speed-up" in proc.stdout
