"""``scripts/bench_compile.py`` end to end at a tiny size on the cheapest model (the models
themselves are tested in tests/models/test_compile.py): the record has every field the table
and docs/benchmarks.md use, the dense layer compiles to one graph, and compiled equals eager."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_compile_tiny(tmp_path):
    out, plot = tmp_path / "compile.json", tmp_path / "compile.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "scripts/bench_compile.py", "--tiny", "--models",
                           "gpt", "--steps", "1", "--out", str(out), "--plot", str(plot)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (record,) = json.loads(out.read_text())
    assert record["model"] == "gpt" and plot.stat().st_size > 0
    assert (record["layer_graphs"], record["layer_breaks"], record["breaks"]) == (1, 0, [])
    assert (record["compiled_layer_graphs"], record["compiled_layer_breaks"]) == (1, 0)
    assert record["step_forward_graphs"] == record["step_backward_graphs"] == 1
    assert record["max_grad_rel_err"] < 1e-4
    assert record["eager_step_ms"] > 0 and record["compiled_step_ms"] > 0
    assert "compiled ms" in proc.stdout
