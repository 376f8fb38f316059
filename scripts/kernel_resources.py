"""Registers, spills and shared memory of every Triton kernel as a Hopper GPU would compile it,
found on a machine without one (plt_train/kernels/offline.py: real launches, the JIT's
specialisation, ``ptxas -v`` for sm_90a).

    python scripts/kernel_resources.py                 # the launches bench_kernels times
    python scripts/kernel_resources.py --gswa-tiles    # + every tiling the G-SWA sweep tries

Each kernel family is launched through its autograd function / op at the issue's shapes in
bf16 (forward and backward):
* G-SWA: B=4, H=16, S=4096, D=128, w=64, both global branches (``triton``: both dK/dV
  branches, loop 1's K/V require grad; ``sdpa``: both window backwards);
* DCCA: d=2048, 64 experts, top-8, r=0.25 (1024 tokens: the token count changes no
  specialisation, 16384 would only slow the CPU matmuls of the backward);
* PLT decode: 4 KV heads x 4, d=128, a 2048-token cache, window 64, R = 2 and 3, batch 1
  (split over 16 programs, as ``default_splits`` picks on 132 SMs) and 32 (2 splits; none on
  a GPU of up to 128 SMs).

Prints a table (one row per distinct compilation) and writes ``kernel_resources.json``.
``blocks/SM`` is the occupancy bound from registers, threads and shared memory; a spill is
local-memory traffic in the kernel's loops.  Static facts, not timings: a GPU session still
decides (``bench_kernels.py``), but a tiling that spills heavily or does not fit is not worth
its time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the JIT
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated

import torch  # noqa: E402

BF16 = torch.bfloat16


def launch_gswa(tiles: dict | None = None) -> None:
    from unittest import mock

    from plt_train.kernels import gswa
    from plt_train.models.plt import ops

    B, H, S, D, w = 4, 16, 4096, 128, 64
    gswa.TILE_OVERRIDE.clear()
    gswa.TILE_OVERRIDE.update(tiles or {})
    try:
        ins = [torch.empty(S, B, H, D, dtype=BF16, requires_grad=True) for _ in range(5)]
        gate = torch.empty(S, B, H, 1, dtype=BF16, requires_grad=True)
        y = gswa.gswa_attention(*ins, gate, D ** -0.5, w, global_branch="triton")
        y.backward(torch.empty_like(y))
        # global_branch="sdpa" (the default), each window backward.  SDPA would run for real
        # here, a [S, S] score matrix on CPU: a stand-in with its shapes and a gradient for
        # each input takes its place (it runs on the CPU; only the Triton launches compile).
        with mock.patch.object(ops, "causal_attention", lambda q, k, v, scale: q + 0 * (k + v)):
            for backward in gswa.WINDOW_BACKWARDS:
                y = gswa.gswa_attention(*ins, gate, D ** -0.5, w, global_branch="sdpa",
                                        window_backward=backward)
                y.backward(torch.empty_like(y))
    finally:
        gswa.TILE_OVERRIDE.clear()


def launch_dcca() -> None:
    from plt_train.kernels import dcca

    T, h, K, r = 1024, 2048, 8, 0.25  # the expert count enters only through dest
    rh = int(r * h)
    n_out = T * K
    dest = torch.arange(n_out, dtype=torch.int32).view(T, K)
    probs = torch.empty(T, K, requires_grad=True)

    def leaf(*shape):
        return torch.empty(*shape, dtype=BF16, requires_grad=True)

    x, w_down, w_up = leaf(T, h), leaf(rh, h), leaf(h, rh)
    z = dcca._descend_permute_op(x, w_down, dest, n_out, True)
    z.backward(torch.empty_like(z))
    out = dcca._combined(leaf(n_out, rh), probs, dest, w_up, True)
    out.backward(torch.empty_like(out))
    full = dcca._combined(leaf(n_out, h), probs, dest, None, True)  # fine-grained
    full.backward(torch.empty_like(full))


def launch_decode() -> None:
    from plt_train.kernels import plt_decode

    kv, group, d, S, w = 4, 4, 128, 2048, 64
    for B, splits in ((1, 16), (32, 2), (32, 1)):  # 32 x 4 programs fill <= 128 SMs
        for R in (2, 3):
            plt_decode.plt_decode_attention(
                q=torch.empty(1, R * B, kv * group, d, dtype=BF16),
                k_full=torch.empty(B, kv, S, d, dtype=BF16),
                v_full=torch.empty(B, kv, S, d, dtype=BF16),
                key_valid=torch.ones(B, S, dtype=torch.bool), scale=d ** -0.5,
                k_win=torch.empty(R - 1, B, kv, w, d, dtype=BF16),
                v_win=torch.empty(R - 1, B, kv, w, d, dtype=BF16),
                win_valid=torch.ones(B, w, dtype=torch.bool),
                gate=torch.empty(1, (R - 1) * B, kv * group, 1, dtype=BF16),
                cursor=torch.tensor([S - 1]), splits=splits)


def collect(gswa_tiles: bool) -> list:
    """One record per distinct compilation: ``Build.row()`` plus the family, whether it uses
    tensor-core ``mma`` and the acquire-release atomic (the split decode merge), and for the
    sweep the tiling it came from."""
    from plt_train.kernels import gswa
    from plt_train.kernels.offline import compiling_for_hopper

    launches = [("gswa", None, launch_gswa), ("dcca", None, launch_dcca),
                ("decode", None, launch_decode)]
    if gswa_tiles:  # every tiling on both paths (a default's compilations appear once)
        launches += [("gswa_tiles", f"fwd {t}", lambda t=t: launch_gswa({"fwd": t}))
                     for t in gswa.SWEEP_FWD_TILES]
        launches += [("gswa_tiles", f"bwd {t}", lambda t=t: launch_gswa({"bwd": t}))
                     for t in gswa.SWEEP_BWD_TILES]
    rows, seen = [], set()
    for i, (family, tiling, launch) in enumerate(launches, 1):
        t0 = time.time()
        with compiling_for_hopper() as builds:
            launch()
        print(f"[kernel_resources] {i}/{len(launches)} {family} {tiling or 'default tiles'}: "
              f"{len(builds)} launches compiled in {time.time() - t0:.1f} s", file=sys.stderr,
              flush=True)
        for b in builds:
            key = (b.kernel, json.dumps(b.constants, sort_keys=True, default=str), b.num_warps,
                   b.num_stages)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"family": family, "tiling": tiling, **b.row(), "mma": "mma" in b.ptx,
                         "acq_rel_atomic": "atom.global.gpu.acq_rel" in b.ptx})
    return rows


def describe(constants: dict) -> str:
    """The tile / flag constants (upper-case names; the JIT's constant-1 ints and the dot
    precision left out)."""
    keep = {k: v for k, v in constants.items() if k.isupper() and k not in ("PREC",)}
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in keep.items())


def print_table(rows: list) -> None:
    print(f"{'kernel':24} {'warps':>5} {'stages':>6} {'regs':>5} {'spill st/ld':>12} "
          f"{'smem KB':>8} {'blocks/SM':>9}  constants")
    for r in rows:
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        smem = f"{r['shared_memory'] / 1024:.1f}" + ("" if r["fits"] else "!")
        print(f"{r['kernel']:24} {r['num_warps']:5} {r['num_stages']:6} {r['registers']:5} "
              f"{spill:>12} {smem:>8} {r['blocks_per_sm']:9}  {describe(r['constants'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gswa-tiles", action="store_true",
                   help="also every G-SWA tiling of bench_kernels' sweep")
    p.add_argument("--out", default="outputs/kernel_resources")
    args = p.parse_args(argv)
    rows = collect(args.gswa_tiles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_resources.json").write_text(json.dumps(rows, indent=1, default=str))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
