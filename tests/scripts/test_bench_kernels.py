"""``scripts/bench_kernels.py --small`` (CPU: Triton interpreter) checks every kernel and
writes the timing records, JSON and plot a GPU session will fill at full size."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, one_process_env


def _bench_small(tmp_path, *args):
    """Runs ``bench_kernels.py --small --strict`` (outside any torchrun group): its stdout
    and records."""
    env = one_process_env()
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--small", "--strict",
                           *args, "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / "bench_kernels.json").read_text())


def test_bench_kernels_small_checks_every_kernel_and_writes_records(tmp_path):
    stdout, records = _bench_small(tmp_path)
    assert (tmp_path / "bench_kernels.png").stat().st_size > 1000
    checks = [r for r in records if r["variant"].startswith("check")]
    assert sorted(r["variant"] for r in checks) == [
        "check", "check", "check_sdpa", "check_sdpa_split", "check_swiglu_fusion",
        "check_triton"]
    assert all(r["ok"] and r["max_rel_err"] <= r["tol"] for r in checks)
    timed = {(r["section"], r["variant"]) for r in records if "ms" in r}
    assert {("gswa", "sdpa_causal"), ("gswa", "sdpa_causal_sbhd"), ("gswa", "gswa_naive"),
            ("gswa", "gswa_kernel"), ("gswa", "gswa_kernel_split_bwd"),
            ("gswa", "gswa_one_kernel")} <= timed
    # the MoE layers: each variant against the bare grouped GEMMs and their FLOPs at peak
    layers = {f"{k}_layer_{x}" for k in ("bigmac", "fine_grained")
              for x in ("torch", "triton", "triton_swiglu", "triton_swiglu_sorted")}
    assert {("dcca", v) for v in layers | {"expert_gemms", "experts_unfused", "experts_fused",
                                            "experts_at_peak"}} <= timed
    assert all(r["vs_peak"] > 0 for r in records if r["variant"] in layers)
    assert all(r["ms"] > 0 and r["vs_baseline"] > 0 for r in records if "ms" in r)
    # every layer and G-SWA row says how long the host took to launch it (on CPU: all of it)
    hosted = [r for r in records if r["variant"] in layers or r["section"] == "gswa" and "ms" in r]
    assert hosted and all(r["host_ms"] == r["ms"] for r in hosted)
    lines = stdout.splitlines()  # the table comes last: its header, then one row each
    header = max(i for i, line in enumerate(lines) if line.startswith("section "))
    assert len(lines) - header - 1 == sum("ms" in r or "max_rel_err" in r for r in records)


def test_gswa_tile_sweep_checks_every_tiling_against_the_default(tmp_path):
    """``--only gswa_tiles`` (the sweep a GPU session runs to tune the G-SWA tiles): every
    tiling's outputs and gradients equal the default tiling's, the default is the baseline."""
    _, records = _bench_small(tmp_path, "--only", "gswa_tiles")
    assert {r["variant"] for r in records} == {
        "fwd_16x16x1x1", "fwd_32x16x1x1", "fwd_32x32x1x1", "bwd_16x1x1", "bwd_32x1x1"}
    assert all(r["ok"] and r["max_rel_err"] <= 1e-4 for r in records)
    for kind in ("fwd", "bwd"):
        rows = [r for r in records if r["variant"].startswith(kind)]
        assert sum(r["default"] for r in rows) == 1 and sum(bool(r.get("best")) for r in rows) == 1
        assert [r["vs_baseline"] for r in rows if r["default"]] == [1.0]


def test_profile_lists_the_largest_ops_of_gswa_and_each_moe_layer(tmp_path):
    """``--only profile``: G-SWA's default path and each MoE layer (BigMac / fine-grained x
    torch / triton / triton with the fused SwiGLU), each with its largest ops and their
    shares of the profiled time; our kernels appear in the paths that use them and only
    there."""
    _, records = _bench_small(tmp_path, "--only", "profile")
    steps = {r["variant"] for r in records}
    assert steps == {"gswa_kernel"} | {f"{k}_layer_{x}" for k in ("bigmac", "fine_grained")
                                       for x in ("torch", "triton", "triton_swiglu")}
    for step in steps:
        rows = [r for r in records if r["variant"] == step]
        assert 0 < len(rows) <= 12 and all(0 < r["share"] <= 1 for r in rows)
        shares = [r["share"] for r in rows]
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
        assert all(r["step_ms"] > 0 and r["kernels_ms"] > 0 for r in rows)
    ours = ("plt_train::combine", "_gather_sum_kernel")  # the op on CPU, the kernel on CUDA
    for r in records:
        assert any(name in r["op"] for name in ours) <= ("triton" in r["variant"]), r
    assert any(any(name in r["op"] for name in ours) for r in records
               if r["variant"] == "bigmac_layer_triton")
    assert any(name in r["op"] for r in records if r["variant"] == "gswa_kernel"
               for name in ("_GSWA", "_gswa_fwd"))


def test_gswa_forward_refuses_tiles_it_would_get_wrong():
    """BLOCK_N must divide BLOCK_M (the sweep found 34 % error with 16 x 32 before this check)."""
    import pytest
    import torch

    from plt_train.kernels import gswa

    x = torch.randn(20, 1, 2, 16)
    gswa.TILE_OVERRIDE["fwd"] = (16, 32, 1, 1)
    try:
        with pytest.raises(ValueError, match="BLOCK_M % BLOCK_N"):
            gswa.gswa_attention(x, x, x, x, x, torch.rand(20, 1, 2, 1), 0.25, 4)
    finally:
        gswa.TILE_OVERRIDE.clear()
