"""``scripts/bench_memory.py`` end to end at a tiny size: the measured activation bytes and
``plt-dryrun``'s estimate agree within 15 % for every recompute mode, on the dense gpt and
on PLT-2 with BigMac layers (the loops, G-SWA and the MoE rows; the other models of the
script's table fall between the two)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, one_process_env


def test_bench_memory_tiny(tmp_path):
    out, plot = tmp_path / "memory.json", tmp_path / "memory.png"
    env = one_process_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "scripts/bench_memory.py", "--tiny", "--models",
                           "gpt,looped-2,plt-2-bigmac", "--out", str(out), "--plot", str(plot)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    records = json.loads(out.read_text())
    models = {"gpt", "looped-2", "plt-2-bigmac"}
    modes = {"none", "core_attn", "selective", "selective+ln", "full"}
    assert {(r["model"], r["mode"]) for r in records} == {(m, k) for m in models for k in modes}
    by = {(r["model"], r["mode"]): r["measured_bytes"] for r in records}
    for r in records:
        assert 0.85 < r["ratio"] < 1.15, r
    for model in models:
        assert by[(model, "full")] < by[(model, "selective")] < by[(model, "none")]
    # Two loops keep the layers' activations twice (what full recompute drops).
    layers = {m: by[(m, "none")] - by[(m, "full")] for m in models}
    assert 1.8 < layers["looped-2"] / layers["gpt"] < 2.2
    assert plot.stat().st_size > 0
