"""Compile every Triton kernel for Hopper (sm_90a, bf16) on a machine without a GPU, as the
JIT would compile the launches ``bench_kernels.py`` times (``scripts/kernel_resources.py``,
``plt_train/kernels/offline.py``), and read ``ptxas -v``.

The CPU tests run the kernels in Triton's interpreter, which executes them as Python and
misses what only the compiler rejects (reading a non-constexpr global, a type the lowering
does not take, a layout conversion it cannot do) and says nothing about resources.  This
checks, before a GPU session: every kernel compiles at the issue's shapes; the attention and
GEMM kernels lower to tensor-core ``mma``; only the split decode kernel has the merge's
acquire-release atomic; every kernel fits in a block's shared memory; and the default tiles
do not spill registers in bulk (~20 s of CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

# kernel -> its distinct compilations (G-SWA: GLOBAL, i.e. global_branch triton or sdpa, and
# for dK/dV: LOCAL; gather-sum: WEIGHTED; decode: LOOPS x SPLITS)
EXPECTED = {"_gswa_fwd": 2, "_gswa_bwd_pre": 2, "_gswa_bwd_dq": 2, "_gswa_bwd_dkdv": 2,
            "_gswa_bwd_window": 1, "_descend_permute_kernel": 1, "_gather_sum_kernel": 2,
            "_combine_backward_kernel": 1, "_plt_decode_kernel": 6}
TENSOR_CORES = {"_gswa_fwd", "_gswa_bwd_dq", "_gswa_bwd_dkdv", "_gswa_bwd_window",
                "_descend_permute_kernel", "_plt_decode_kernel"}
# Spills per thread the default tiles may have (2026-11-27, Triton 3.9: at most 56 bytes, the
# global branch's dK/dV).  A change that spills kilobytes (e.g. a second live accumulator at
# the 4-warp forward tile: 3 KB) is a slowdown no CPU test would otherwise see.
MAX_SPILL_BYTES = 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_every_kernel_compiles_for_hopper_and_fits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "scripts/kernel_resources.py", "--out",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and \
            "CompilationError" not in proc.stderr:
        pytest.skip(f"no CUDA assembler here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())
    counts = {}
    for r in rows:
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
    assert counts == EXPECTED
    for r in rows:
        what = f"{r['kernel']} {r['constants']}"
        assert r["mma"] == (r["kernel"] in TENSOR_CORES), what
        split = r["constants"].get("SPLITS", 1) > 1
        assert r["acq_rel_atomic"] == split, what  # the split decode's merge, nothing else
        assert r["fits"] and r["blocks_per_sm"] >= 1, what
        assert 0 < r["registers"] <= 255, what
        assert r["spill_stores"] <= MAX_SPILL_BYTES, (what, r["spill_stores"])
    assert {r["constants"]["SPLITS"] for r in rows if r["kernel"] == "_plt_decode_kernel"} \
        == {1, 2, 16}
    assert "blocks/SM" in proc.stdout  # the table


def test_occupancy_bound_counts_registers_threads_and_shared_memory():
    """``Build.blocks_per_sm``: registers go to warps in units of 8 per thread, 64K per SM;
    2048 threads; 228 KB of shared memory with 1 KB reserved per block."""
    from plt_train.kernels.offline import Build

    def build(regs, warps, smem_kb):
        return Build("k", {}, warps, 3, regs, 0, 0, int(smem_kb * 1024))

    assert build(255, 8, 128).blocks_per_sm == 1  # 256 x 32 x 8 = all 64K registers
    assert build(128, 4, 0).blocks_per_sm == 4  # registers bound
    assert build(128, 4, 70).blocks_per_sm == 3  # shared memory bound: 228 // 71
    assert build(32, 4, 0).blocks_per_sm == 16  # threads bound: 2048 // 128
    assert build(121, 8, 0).blocks_per_sm == 2  # 121 rounds up to 128
    assert build(16, 1, 0).blocks_per_sm == 32  # the hardware's block limit
    assert not build(64, 4, 228).fits and build(64, 4, 227).fits
