"""``scripts/bench_decode.py --tiny`` runs and writes the records the issue asks for."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, one_process_env


def run_bench(out, *args):
    # A fresh process group: not the variables an in-process test left in our environment.
    # (TRITON_INTERPRET, set by conftest.py without a GPU, is kept: --kernel triton runs.)
    env = one_process_env()
    proc = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tiny", "--out",
                           str(out), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "bench_decode.json").read_text())


def test_bench_decode_tiny_writes_records_and_plot(tmp_path):
    proc, records = run_bench(tmp_path)
    assert (tmp_path / "bench_decode.png").stat().st_size > 1000
    assert {(r["model"], r["loops"], r["batch"]) for r in records} == {
        (m, R, b) for m, R in [("vanilla", 1), ("looped", 2), ("looped", 3), ("plt", 2),
                               ("plt", 3)] for b in (1, 4)}
    for r in records:
        assert {"model", "loops", "batch", "ms_per_token", "kv_bytes", "device", "cuda_graph",
                "kernel"} <= set(r)
        assert r["kernel"] == ("auto" if r["model"] == "plt" else None)
        assert r["ms_per_token"] > 0
        if r["model"] == "plt":  # exactly loop 1's cache plus (R-1) windows
            assert r["kv_vs_vanilla"] == pytest.approx(r["kv_bound"], rel=0, abs=1e-12)
        elif r["model"] == "looped":
            assert r["kv_vs_vanilla"] == r["loops"]
    assert "ms/token" in proc.stdout.splitlines()[-12]  # the table comes last


def test_bench_decode_times_kernel_and_graph_variants_side_by_side(tmp_path):
    """--kernel torch triton: both PLT variants on the same weights, one vanilla baseline per
    step mode (on CPU --cuda-graph auto is off, so it is timed once)."""
    _, records = run_bench(tmp_path, "--batch", "1", "--new", "2", "--warmup", "1",
                           "--cuda-graph", "off", "auto", "--kernel", "torch", "triton")
    assert {r["cuda_graph"] for r in records} == {"eager"}
    assert sorted((r["model"], r["loops"], r["kernel"]) for r in records) == [
        ("looped", 2, None), ("looped", 3, None), ("plt", 2, "torch"), ("plt", 2, "triton"),
        ("plt", 3, "torch"), ("plt", 3, "triton"), ("vanilla", 1, None)]
    assert all(r["latency_vs_vanilla"] > 0 for r in records)


def test_bench_decode_times_chosen_models_of_other_depths_against_vanilla(tmp_path):
    """--models with @LAYERS: a deeper vanilla beside the looped model of the same compute,
    timed in the same run; the ratios stay over vanilla at --layers."""
    proc, records = run_bench(tmp_path, "--batch", "1", "--new", "2", "--warmup", "1",
                              "--models", "vanilla", "vanilla@4", "looped-2")
    rows = {(r["model"], r["loops"], r["layers"]): r for r in records}
    assert set(rows) == {("vanilla", 1, 2), ("vanilla", 1, 4), ("looped", 2, 2)}
    assert rows[("vanilla", 1, 2)]["latency_vs_vanilla"] == 1.0
    assert rows[("vanilla", 1, 4)]["kv_vs_vanilla"] == rows[("looped", 2, 2)]["kv_vs_vanilla"] == 2
    bad = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tiny", "--models",
                          "looped-2", "--out", str(tmp_path / "bad")], cwd=REPO,
                         env=one_process_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "need vanilla at --layers 2" in bad.stderr


def test_bench_decode_times_a_plt_at_several_windows_side_by_side(tmp_path):
    """--models with :wWINDOW: PLT at its own window beside PLT at --window (the tiny 8),
    each cache exactly loop 1's plus its window; only PLT takes a window."""
    _, records = run_bench(tmp_path, "--batch", "1", "--new", "2", "--warmup", "1",
                           "--models", "vanilla", "plt-2:w2", "plt-2")
    rows = {(r["model"], r["window"]): r for r in records}
    assert set(rows) == {("vanilla", None), ("plt", 2), ("plt", 8)}
    for w in (2, 8):
        r = rows[("plt", w)]
        assert r["kv_vs_vanilla"] == pytest.approx(1 + w / r["cached_positions"], rel=0,
                                                   abs=1e-12)
    assert rows[("plt", 2)]["kv_bytes"] < rows[("plt", 8)]["kv_bytes"]
    for spec in ("looped-2:w4", "plt-2:4", "plt-2:w0"):
        bad = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tiny", "--models",
                              "vanilla", spec, "--out", str(tmp_path / "bad")], cwd=REPO,
                             env=one_process_env(), capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "--models:" in bad.stderr, spec
