"""PLT's gated sliding-window attention (G-SWA) for loops r >= 2, fused, forward and backward.

    y = g * causal(q, K1, V1) + (1 - g) * window_w(q, K, V)

with K1/V1 loop 1's keys/values of the layer (shared), K/V the loop's own, g [s, b, heads] the
per-head gate.  Where loop 1's causal branch runs is ``global_branch``:

* ``sdpa`` (the default): torch's SDPA (FlashAttention / cuDNN) computes ``y_global``; the
  Triton forward runs the window branch over each block of queries, reads ``y_global`` and
  mixes.  The branches have separate softmaxes, so the split costs one extra read; and SDPA's
  causal attention was 2x (forward) and 4x (backward) faster than ours on an H200
  (2026-11-27, docs/benchmarks.md).
* ``triton``: one forward pass over each block of queries runs both online softmaxes.

Either way no [s, s] score matrix or mask is materialised, and the forward writes ``y`` plus
``diff = y_global - y_local``, from which the backward recovers both branch outputs without
dividing by g (``y_global = y + (1 - g) diff``, ``y_local = y - g diff``).

Backward: one kernel computes the per-row terms (the gate gradient ``<dy, diff>`` and the
``delta`` of each branch run here; with ``sdpa`` also ``g dy``, the gradient SDPA's backward
takes, in the layout of SDPA's output).  With ``sdpa``, SDPA's backward runs next, and then
one kernel computes the window branch's dQ (added into SDPA's dQ in place), dK and dV
(``window_backward="fused"``; ``"split"``: a dQ kernel, then a dK/dV kernel).  With
``triton``: a dK/dV kernel per branch (for K1/V1 only when they are not detached, as they are
in the released recipe) and one dQ kernel over both.

Layout: megatron's [s, b, heads, d] with any strides (q/k/v are views of the fused QKV
projection); grouped K/V heads (GQA) are read in place.  The reference is
``plt_train.models.plt.ops.gswa``; left-padded batches (prefill with ``key_valid``) use it.
Importing this module imports Triton: callers check ``kernels.use_triton`` first.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from plt_train.kernels import gpu_tiles, max_rel_err, self_check_precision, use_triton, verified

LOG2E = 1.4426950408889634


def fused_applies(choice: str, q: torch.Tensor, key_valid) -> bool:
    """Whether the fused kernel takes this call (else the reference does)."""
    if key_valid is not None or q.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or q.shape[-1] > 256 or not use_triton(choice, q.device):
        return False
    return choice == "triton" or verified("gswa", q.device, _self_check)


def _self_check(device) -> bool:
    """Forward + backward at a small ragged GQA shape in bf16 (fp32 on CPU) vs the fp32
    reference: the first-use check of ``kernels.verified``."""
    from plt_train.models.plt import ops

    dtype, tol = self_check_precision(device)
    g = torch.Generator(device=device).manual_seed(0)
    S, B, HQ, HK, D, w = (200, 1, 4, 2, 64, 16) if device.type == "cuda" else (40, 1, 4, 2, 16, 6)
    ts = [torch.randn(S, B, h, D, generator=g, device=device).to(dtype)
          for h in (HQ, HK, HK, HK, HK)]
    ts.append(torch.rand(S, B, HQ, 1, generator=g, device=device).to(dtype))
    dy = torch.randn(S, B, HQ, D, generator=g, device=device).to(dtype)
    with torch.enable_grad():
        ins = [t.clone().requires_grad_(True) for t in ts]
        y = gswa_attention(*ins, D ** -0.5, w)
        got = [y, *torch.autograd.grad(y, ins, dy)]
        ref_in = [t.float().requires_grad_(True) for t in ts]
        y_ref = ops.gswa(*ref_in, D ** -0.5, w)
        want = [y_ref, *torch.autograd.grad(y_ref, ref_in, dy.float())]
    return max_rel_err(got, want) < tol


# Where loop 1's causal branch runs by default: see gswa_attention.
GLOBAL_BRANCHES = ("sdpa", "triton")
GLOBAL_BRANCH = "sdpa"
# The window branch's backward with ``sdpa``: "fused" (one kernel per key block for dQ, dK
# and dV, the default since 2026-11-27) or "split" (a dQ kernel and a dK/dV kernel, as the
# ``triton`` path still does).  See _GSWA.
WINDOW_BACKWARDS = ("fused", "split")
WINDOW_BACKWARD = "fused"


def gswa_attention(q, k_shared, v_shared, k, v, gate, scale: float, window: int,
                   global_branch: str | None = None, window_backward: str | None = None):
    """q [s, b, nq, d], k*/v* [s, b, nk, d], gate [s, b, nq(, 1)] -> y [s, b, nq, d].

    ``global_branch`` (default ``GLOBAL_BRANCH``): ``sdpa`` runs loop 1's causal branch through
    torch's SDPA (FlashAttention / cuDNN) and only the window branch, the gate mix and their
    backward in Triton; ``triton`` runs both branches in the one Triton kernel.  The branches
    have separate softmaxes, so splitting them costs only re-reading ``y_global``; and on an
    H200 (2026-11-27, docs/benchmarks.md) our Triton causal attention ran at about half of
    SDPA's forward speed and a quarter of its backward's, so ``sdpa`` is the default.
    ``window_backward`` (default ``WINDOW_BACKWARD``, ``sdpa`` only): ``fused`` or ``split``."""
    mode = global_branch or GLOBAL_BRANCH
    if mode not in GLOBAL_BRANCHES:
        raise ValueError(f"global_branch must be one of {GLOBAL_BRANCHES}, not {mode!r}")
    backward = window_backward or WINDOW_BACKWARD
    if backward not in WINDOW_BACKWARDS:
        raise ValueError(f"window_backward must be one of {WINDOW_BACKWARDS}, not {backward!r}")
    if torch.compiler.is_compiling():
        return _compiled_gswa(q, k_shared, v_shared, k, v, gate, scale, window, mode)
    return _GSWA.apply(q, k_shared, v_shared, k, v, gate, scale, window, mode, backward,
                       torch.is_grad_enabled())


# -- kernels ---------------------------------------------------------------------------------
@triton.jit
def _fwd_branch(acc, m_i, l_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, S,
                window, qk_scale, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of q against keys [lo, hi); scores in base-2 units."""
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[None, :] < S) & (offs_d[:, None] < D)
        kt = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=kv_mask,
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if MASK:
            keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
            if LOCAL:
                keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _gswa_fwd(Q, K1, V1, K, V, G, YG, Y, DIFF, LSE_G, LSE_L,
              sqs, sqb, sqh, sqd, sk1s, sk1b, sk1h, sk1d, sv1s, sv1b, sv1h, sv1d,
              sks, skb, skh, skd, svs, svb, svh, svd, sygs, sygb, sygh, sygd,
              S, B, HQ, GROUP, D, window, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              GLOBAL: tl.constexpr, PREC: tl.constexpr):
    """GLOBAL: both branches here; else loop 1's branch ``YG`` comes in (from SDPA)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    hi = tl.minimum(m0 + BLOCK_M, S)

    row = (offs_m * B + b) * HQ + h  # [s, b, heads] fp32 side tensors
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    if GLOBAL:
        # global branch: causal over loop 1's K/V; blocks left of the diagonal need no mask
        acc_g = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_g = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_g = tl.zeros([BLOCK_M], dtype=tl.float32)
        k1 = K1 + b * sk1b + hk * sk1h
        v1 = V1 + b * sv1b + hk * sv1h
        acc_g, m_g, l_g = _fwd_branch(acc_g, m_g, l_g, q, k1, v1, sk1s, sk1d, sv1s, sv1d, offs_m,
                                      0, m0, S, window, qk_scale, D, BLOCK_N, BLOCK_D,
                                      False, False, PREC)
        acc_g, m_g, l_g = _fwd_branch(acc_g, m_g, l_g, q, k1, v1, sk1s, sk1d, sv1s, sv1d, offs_m,
                                      m0, hi, S, window, qk_scale, D, BLOCK_N, BLOCK_D,
                                      True, False, PREC)
        l_g = tl.where(row_ok, l_g, 1.0)
        y_g = acc_g / l_g[:, None]
        tl.store(LSE_G + row, m_g + tl.log2(l_g), mask=row_ok)
    else:
        y_g = tl.load(YG + b * sygb + h * sygh + offs_m[:, None] * sygs
                      + offs_d[None, :] * sygd, mask=mask, other=0.0).to(tl.float32)
    # local branch: the loop's own K/V in the window (i - w, i]
    acc_l = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_l = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    acc_l, m_l, l_l = _fwd_branch(acc_l, m_l, l_l, q, K + b * skb + hk * skh,
                                  V + b * svb + hk * svh, sks, skd, svs, svd, offs_m,
                                  lo, hi, S, window, qk_scale, D, BLOCK_N, BLOCK_D,
                                  True, True, PREC)

    l_l = tl.where(row_ok, l_l, 1.0)
    y_l = acc_l / l_l[:, None]
    g = tl.load(G + row, mask=row_ok, other=0.0)
    y = g[:, None] * y_g + (1.0 - g[:, None]) * y_l
    out = (offs_m[:, None] * B + b) * HQ * D + h * D + offs_d[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(DIFF + out, (y_g - y_l).to(DIFF.dtype.element_ty), mask=mask)
    tl.store(LSE_L + row, m_l + tl.log2(l_l), mask=row_ok)


@triton.jit
def _gswa_bwd_pre(DY, Y, DIFF, G, DELTA_G, DELTA_L, DGATE, DYG, ROWS, B, HQ, D,
                  sdgs, sdgb, sdgh, sdgd,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DYG: tl.constexpr):
    """Per (position, batch, head) row: ``dgate = <dy, diff>``, and each branch's ``delta =
    <dO_branch, y_branch>`` with ``dO_global = g dy``, ``y_global = y + (1 - g) diff``,
    ``dO_local = (1 - g) dy``, ``y_local = y - g diff``.  One read of dy, y and diff.
    WRITE_DYG (SDPA ran loop 1's branch): ``dO_global`` itself, for SDPA's backward, at
    strides ``sdg*`` of [s, b, h, d] (SDPA's output's layout), and no ``delta`` of the global
    branch, which SDPA's backward computes for itself."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < D)
    at = rows[:, None] * D + cols[None, :]
    dy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32)
    dy_y = tl.sum(dy * tl.load(Y + at, mask=mask, other=0.0).to(tl.float32), 1)
    dgate = tl.sum(dy * tl.load(DIFF + at, mask=mask, other=0.0).to(tl.float32), 1)
    g = tl.load(G + rows, mask=rows < ROWS, other=0.0)
    if WRITE_DYG:
        pos, b, h = rows // (B * HQ), (rows // HQ) % B, rows % HQ
        dyg = DYG + (pos * sdgs + b * sdgb + h * sdgh)[:, None] + cols[None, :] * sdgd
        tl.store(dyg, (dy * g[:, None]).to(DYG.dtype.element_ty), mask=mask)
    else:
        tl.store(DELTA_G + rows, g * (dy_y + (1.0 - g) * dgate), mask=rows < ROWS)
    tl.store(DELTA_L + rows, (1.0 - g) * (dy_y - g * dgate), mask=rows < ROWS)
    tl.store(DGATE + rows, dgate, mask=rows < ROWS)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DY, G, LSE, DELTA, sqs, sqd, offs_n, lo, hi, b, h, S, B,
                 HQ, D, window, qk_scale, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASK: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of query head h."""
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK):
        offs_m = m0 + tl.arange(0, BLOCK)
        row_ok = offs_m < S
        rmask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=rmask, other=0.0)
        row = (offs_m * B + b) * HQ + h
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
        g = tl.load(G + row, mask=row_ok, other=0.0)
        if LOCAL:
            g = 1.0 - g
        dy = tl.load(DY + (offs_m[:, None] * B + b) * HQ * D + h * D + offs_d[None, :],
                     mask=rmask, other=0.0)
        do = (dy * g[:, None]).to(q.dtype)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [keys, queries]
        pt = tl.exp2(st - lse[None, :])
        if MASK:  # the diagonal block, the window, and the ragged last block
            keep = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :]
            if LOCAL:
                keep = keep & (offs_m[None, :] < offs_n[:, None] + window)
            pt = tl.where(keep, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _gswa_bwd_dkdv(Q, K, V, DY, G, LSE, DELTA, DK, DV,
                   sqs, sqb, sqh, sqd, sks, skb, skh, skd, svs, svb, svh, svd,
                   S, B, HQ, HK, GROUP, D, window, qk_scale, sm_scale,
                   LOCAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr):
    """dK, dV of one branch for one key block and KV head, over the queries that see it
    (and every query head of the KV group).  BLOCK_M == BLOCK_N, so the diagonal is one
    block; in the global branch only it and the ragged last block need masks."""
    pid_n, pid_bk = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bk // HK, pid_bk % HK
    n0 = pid_n * BLOCK
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < S
    dmask = offs_d[None, :] < D
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=col_ok[:, None] & dmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=col_ok[:, None] & dmask, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    full_end = S // BLOCK * BLOCK  # query blocks below this need no bounds mask
    for h in range(hk * GROUP, hk * GROUP + GROUP):
        q_base = Q + b * sqb + h * sqh
        if LOCAL:
            hi = tl.minimum(n0 + BLOCK + window - 1, S)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DY, G, LSE, DELTA, sqs, sqd, offs_n,
                                  n0, hi, b, h, S, B, HQ, D, window, qk_scale, BLOCK, BLOCK_D,
                                  True, True, PREC)
        else:
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DY, G, LSE, DELTA, sqs, sqd, offs_n,
                                  n0, n0 + BLOCK, b, h, S, B, HQ, D, window, qk_scale, BLOCK,
                                  BLOCK_D, True, False, PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DY, G, LSE, DELTA, sqs, sqd, offs_n,
                                  n0 + BLOCK, full_end, b, h, S, B, HQ, D, window, qk_scale,
                                  BLOCK, BLOCK_D, False, False, PREC)
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, DY, G, LSE, DELTA, sqs, sqd, offs_n,
                                  tl.maximum(full_end, n0 + BLOCK), S, b, h, S, B, HQ, D,
                                  window, qk_scale, BLOCK, BLOCK_D, True, False, PREC)
    out = (offs_n[:, None] * B + b) * HK * D + hk * D + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & dmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dmask)


@triton.jit
def _dq_branch(dq, q, do, lse, delta, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, S,
               window, qk_scale, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask,
                    other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK:
            keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < S)
            if LOCAL:
                keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _gswa_bwd_dq(Q, K1, V1, K, V, DY, G, LSE_G, LSE_L, DELTA_G, DELTA_L, DQ,
                 sqs, sqb, sqh, sqd, sk1s, sk1b, sk1h, sk1d, sv1s, sv1b, sv1h, sv1d,
                 sks, skb, skh, skd, svs, svb, svh, svd, sdqs, sdqb, sdqh, sdqd,
                 S, B, HQ, GROUP, D, window, qk_scale, sm_scale,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, GLOBAL: tl.constexpr,
                 ACC_DQ: tl.constexpr, PREC: tl.constexpr):
    """dQ of one query block and head over the branches run here.  ACC_DQ: DQ holds SDPA's
    dQ of loop 1's branch, and this adds to it."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK
    offs_m = m0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    rmask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=rmask, other=0.0)
    dy = tl.load(DY + (offs_m[:, None] * B + b) * HQ * D + h * D + offs_d[None, :],
                 mask=rmask, other=0.0)
    row = (offs_m * B + b) * HQ + h
    g = tl.load(G + row, mask=row_ok, other=0.0)
    hi = tl.minimum(m0 + BLOCK, S)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)

    if GLOBAL:  # else SDPA's backward adds loop 1's branch to dq
        do = (dy * g[:, None]).to(q.dtype)
        lse = tl.load(LSE_G + row, mask=row_ok, other=0.0)
        delta = tl.load(DELTA_G + row, mask=row_ok, other=0.0)
        k1 = K1 + b * sk1b + hk * sk1h
        v1 = V1 + b * sv1b + hk * sv1h
        dq = _dq_branch(dq, q, do, lse, delta, k1, v1, sk1s, sk1d, sv1s, sv1d, offs_m, 0, m0,
                        S, window, qk_scale, D, BLOCK, BLOCK_D, False, False, PREC)
        dq = _dq_branch(dq, q, do, lse, delta, k1, v1, sk1s, sk1d, sv1s, sv1d, offs_m, m0, hi,
                        S, window, qk_scale, D, BLOCK, BLOCK_D, True, False, PREC)

    do = (dy * (1.0 - g[:, None])).to(q.dtype)
    lse = tl.load(LSE_L + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA_L + row, mask=row_ok, other=0.0)
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK * BLOCK
    dq = _dq_branch(dq, q, do, lse, delta, K + b * skb + hk * skh, V + b * svb + hk * svh,
                    sks, skd, svs, svd, offs_m, lo, hi, S, window, qk_scale, D, BLOCK, BLOCK_D,
                    True, True, PREC)
    _store_dq(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
              dq * sm_scale, rmask, ACC_DQ)


@triton.jit
def _store_dq(ptrs, dq, mask, ACC_DQ: tl.constexpr):
    if ACC_DQ:  # in place: each dQ tile belongs to one program
        dq += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, dq.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _gswa_bwd_window(Q, K, V, DY, G, LSE, DELTA, DQ, DK, DV,
                     sqs, sqb, sqh, sqd, sks, skb, skh, skd, svs, svb, svh, svd,
                     sdqs, sdqb, sdqh, sdqd, S, B, HQ, HK, GROUP, D, window, qk_scale, sm_scale,
                     ACC_DQ: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
    """The window branch's whole backward in one launch: program j first computes dQ of
    query block j for each query head of its KV group (the dQ kernel's loop), then dK, dV of
    key block j over those heads (the dK/dV kernel's).  The two phases touch the same rows of
    q, dy, K and V, so the second reads them from cache rather than memory, and neither
    phase keeps the other's accumulators live (sharing the diagonal block's P and dS
    between them did: 248 bytes of spills per thread for sm_90, plt_train/kernels/offline.py,
    2026-11-27).  ACC_DQ: DQ holds SDPA's dQ, and this adds to it."""
    pid_n, pid_bk = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bk // HK, pid_bk % HK
    n0 = pid_n * BLOCK
    offs = n0 + tl.arange(0, BLOCK)  # query block j in phase 1, key block j in phase 2
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < S
    tile = ok[:, None] & (offs_d[None, :] < D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    first_key = tl.maximum(n0 - window + 1, 0) // BLOCK * BLOCK  # query block j's window
    for h in range(hk * GROUP, hk * GROUP + GROUP):
        q = tl.load(Q + b * sqb + h * sqh + offs[:, None] * sqs + offs_d[None, :] * sqd,
                    mask=tile, other=0.0)
        row = (offs * B + b) * HQ + h
        lse = tl.load(LSE + row, mask=ok, other=0.0)
        delta = tl.load(DELTA + row, mask=ok, other=0.0)
        g_local = 1.0 - tl.load(G + row, mask=ok, other=0.0)
        dy = tl.load(DY + (offs[:, None] * B + b) * HQ * D + h * D + offs_d[None, :], mask=tile,
                     other=0.0)
        do = (dy * g_local[:, None]).to(q.dtype)
        dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        dq = _dq_branch(dq, q, do, lse, delta, k_base, v_base, sks, skd, svs, svd, offs,
                        first_key, tl.minimum(n0 + BLOCK, S), S, window, qk_scale, D, BLOCK,
                        BLOCK_D, True, True, PREC)
        _store_dq(DQ + b * sdqb + h * sdqh + offs[:, None] * sdqs + offs_d[None, :] * sdqd,
                  dq * sm_scale, tile, ACC_DQ)

    k = tl.load(k_base + offs[:, None] * sks + offs_d[None, :] * skd, mask=tile, other=0.0)
    v = tl.load(v_base + offs[:, None] * svs + offs_d[None, :] * svd, mask=tile, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    last_query = tl.minimum(n0 + BLOCK + window - 1, S)  # the queries key block j reaches
    for h in range(hk * GROUP, hk * GROUP + GROUP):
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q + b * sqb + h * sqh, DY, G, LSE, DELTA, sqs, sqd,
                              offs, n0, last_query, b, h, S, B, HQ, D, window, qk_scale, BLOCK,
                              BLOCK_D, True, True, PREC)
    out = (offs[:, None] * B + b) * HK * D + hk * D + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=tile)


# -- launch ----------------------------------------------------------------------------------
# Tile sizes forced for the sweep in scripts/bench_kernels.py (section gswa_tiles): "fwd" =
# (BLOCK_M, BLOCK_N, num_warps, num_stages), "bwd" = (BLOCK, num_warps, num_stages).  Empty in
# normal runs: _blocks' choice.
TILE_OVERRIDE: dict = {}
# The GPU tilings that sweep times.  Forward tiles need BLOCK_M % BLOCK_N == 0.  Left out after
# scripts/kernel_resources.py (ptxas for sm_90a at the shape, 2026-11-27): tilings that
# spill over 1 KB of registers per thread (forward 128x64 and 128x32 with 4 warps, 256x64;
# backward 64 with 4 warps and 3 stages, 128-blocks) and 128x128 (192 B spills, 224 KB of
# the 227 KB shared memory).
SWEEP_FWD_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3),
                   (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3)]
SWEEP_BWD_TILES = [(64, 8, 2), (64, 8, 3), (64, 8, 1), (32, 4, 2), (32, 4, 3), (32, 8, 2),
                   (32, 4, 1)]


def _blocks(q: torch.Tensor, window_only: bool = False) -> dict:
    """Tile sizes.  The interpreter runs small tiles (tests use short ragged sequences);
    on GPU the Triton flash-attention tutorial's Hopper choices for head dim <= 128, except
    the forward of the window branch alone (``sdpa``, the default path): 64 x 64 with 4 warps.
    Why: with w = 64 a 128-query block scores 192 keys per query where a 64-query block scores
    128; the tile fits 2 blocks per SM where 128 x 64 fits 1 (docs/results/
    kernel_resources_sm90_gswa_tiles.json); and on the H200 (run 1, both branches) it was the
    fastest forward of the sweep's eight, 0.851 ms against the default's 0.963.  The next
    sweep times it on this path."""
    d = triton.next_power_of_2(max(q.shape[-1], 16))
    if not gpu_tiles(q):
        tiles = dict(fwd=(16, 16, 1, 1), bwd=(16, 1, 1))
    elif d <= 64:
        tiles = dict(fwd=(64, 64, 4, 3) if window_only else (128, 64, 4, 3), bwd=(64, 4, 3))
    elif d <= 128:
        tiles = dict(fwd=(64, 64, 4, 3) if window_only else (128, 64, 8, 3), bwd=(64, 8, 2))
    else:
        tiles = dict(fwd=(64, 32, 8, 2), bwd=(32, 8, 1))
    return {**tiles, **TILE_OVERRIDE, "BLOCK_D": d}


def _strides(t):
    return tuple(t.stride())


def _launch_forward(q, k1, v1, k, v, g, y_global, scale: float, window: int):
    """The forward kernel: (y, diff, lse_g, lse_l).  ``y_global`` None runs loop 1's branch
    here too (``triton``); else it is read (``sdpa``) and ``lse_g`` is an empty placeholder.
    ``g`` is the gate as [s, b, heads] fp32, contiguous."""
    S, B, HQ, D = q.shape
    HK = k.shape[2]
    fused_global = y_global is None
    if HQ % HK:
        raise ValueError(f"query heads {HQ} are not a multiple of KV heads {HK}")
    if k1.shape[2] != HK:
        raise ValueError(f"loop 1's K/V have {k1.shape[2]} heads, the loop's own {HK}")
    y = torch.empty(S, B, HQ, D, dtype=q.dtype, device=q.device)
    diff = torch.empty_like(y)
    lse_l = torch.empty(S, B, HQ, dtype=torch.float32, device=q.device)
    lse_g = torch.empty_like(lse_l) if fused_global else lse_l.new_empty(0)
    yg_ = y if fused_global else y_global  # a placeholder with GLOBAL
    cfg = _blocks(q, window_only=not fused_global)
    bm, bn, warps, stages = cfg["fwd"]
    if bm % bn:  # the unmasked causal blocks [0, m0) are stepped by BLOCK_N
        raise ValueError(f"G-SWA forward tiles need BLOCK_M % BLOCK_N == 0, got {bm}, {bn}")
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(S, bm), B * HQ)
    _gswa_fwd[grid](q, k1, v1, k, v, g, yg_, y, diff, lse_g if fused_global else lse_l, lse_l,
                    *_strides(q), *_strides(k1), *_strides(v1), *_strides(k),
                    *_strides(v), *_strides(yg_),
                    S, B, HQ, HQ // HK, D, window, scale * LOG2E,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"], GLOBAL=fused_global,
                    PREC=prec, num_warps=warps, num_stages=stages)
    return y, diff, lse_g, lse_l


def _launch_backward_rows(dy, q, y, diff, g, fused_global: bool, dy_global_like):
    """The per-row backward kernel: (delta_g, delta_l, dgate, dy_global).  With ``sdpa``
    ``dy_global`` = g dy in the layout of ``dy_global_like`` (SDPA's output) and ``delta_g`` is
    ``delta_l`` (a placeholder: SDPA computes loop 1's delta itself); with ``triton`` it is
    ``dy`` (a placeholder, not written)."""
    S, B, HQ, D = q.shape
    cfg = _blocks(q, window_only=not fused_global)
    delta_l, dgate = torch.empty_like(g), torch.empty_like(g)
    if fused_global:
        delta_g, dy_global = torch.empty_like(g), dy
    else:
        delta_g = delta_l
        dy_global = torch.empty_strided(dy_global_like.shape, dy_global_like.stride(),
                                        dtype=dy.dtype, device=dy.device)
    rows = g.numel()
    block_r = 32 if gpu_tiles(q) else 16
    _gswa_bwd_pre[(triton.cdiv(rows, block_r),)](
        dy, y, diff, g, delta_g, delta_l, dgate, dy_global, rows, B, HQ, D,
        *_strides(dy_global), BLOCK_R=block_r, BLOCK_D=cfg["BLOCK_D"],
        WRITE_DYG=not fused_global)
    return delta_g, delta_l, dgate, dy_global


def _launch_backward_blocks(dy, q, k1, v1, k, v, g, lse_g, lse_l, delta_g, delta_l, dq,
                            scale: float, window: int, fused_global: bool,
                            window_backward: str, need_kv1: bool, need_kv: bool):
    """The block kernels of the backward: (dq, dk1, dv1, dk, dv).  ``dq`` given (SDPA's, with
    ``sdpa``) is added to in place; None: written.  dK1/dV1 only with ``triton`` and
    ``need_kv1``; with the fused window backward dK/dV always come (dQ comes from the same
    pass), else only with ``need_kv``."""
    S, B, HQ, D = q.shape
    HK = k.shape[2]
    cfg = _blocks(q, window_only=not fused_global)
    acc_dq = dq is not None
    if not acc_dq:
        dq = torch.empty(S, B, HQ, D, dtype=q.dtype, device=q.device)
    blk, warps, stages = cfg["bwd"]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    common = dict(BLOCK=blk, BLOCK_D=cfg["BLOCK_D"], PREC=prec, num_warps=warps,
                  num_stages=stages)
    args = (S, B, HQ, HQ // HK, D, window, scale * LOG2E, scale)

    def new_kv():
        return (torch.empty(S, B, HK, D, dtype=k.dtype, device=q.device),
                torch.empty(S, B, HK, D, dtype=v.dtype, device=q.device))

    dk1 = dv1 = dk = dv = None
    if not fused_global and window_backward == "fused":
        dk, dv = new_kv()
        _gswa_bwd_window[(triton.cdiv(S, blk), B * HK)](
            q, k, v, dy, g, lse_l, delta_l, dq, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dq),
            S, B, HQ, HK, HQ // HK, D, window, scale * LOG2E, scale,
            ACC_DQ=acc_dq, **common)
        return dq, dk1, dv1, dk, dv
    _gswa_bwd_dq[(triton.cdiv(S, blk), B * HQ)](
        q, k1, v1, k, v, dy, g, lse_g if fused_global else lse_l, lse_l, delta_g, delta_l, dq,
        *_strides(q), *_strides(k1), *_strides(v1), *_strides(k), *_strides(v),
        *_strides(dq), *args, GLOBAL=fused_global, ACC_DQ=acc_dq, **common)

    def dkdv(kk, vv, lse, delta, local):
        dk_, dv_ = new_kv()
        _gswa_bwd_dkdv[(triton.cdiv(S, blk), B * HK)](
            q, kk, vv, dy, g, lse, delta, dk_, dv_,
            *_strides(q), *_strides(kk), *_strides(vv),
            S, B, HQ, HK, HQ // HK, D, window, scale * LOG2E, scale,
            LOCAL=local, **common)
        return dk_, dv_

    if fused_global and need_kv1:  # loop 1's K/V are detached in the released recipe
        dk1, dv1 = dkdv(k1, v1, lse_g, delta_g, False)
    if need_kv:
        dk, dv = dkdv(k, v, lse_l, delta_l, True)
    return dq, dk1, dv1, dk, dv


class _GSWA(torch.autograd.Function):
    """``triton``: loop 1's branch computed here from k1, v1.  ``sdpa``: SDPA computes it in
    the forward, recorded as a small autograd graph of its own (``ctx.sdpa``) whenever a
    gradient is wanted; the backward runs that graph with ``g * dy`` first, then the window
    kernels add their dQ into SDPA's dQ in place, instead of autograd summing two dQ tensors
    afterwards (three more passes over [s, b, h, d]).  Eager mode only: under torch.compile
    ``gswa_attention`` composes the custom ops below instead (a graph recorded inside a
    forward cannot be traced)."""

    @staticmethod
    def forward(ctx, q, k1, v1, k, v, gate, scale, window, mode, window_backward, grad_mode):
        S, B, HQ, D = q.shape
        fused_global = mode == "triton"
        ctx.sdpa = None
        y_global = None
        if not fused_global:
            from plt_train.models.plt import ops

            track = grad_mode and any(ctx.needs_input_grad[:3])
            with torch.enable_grad() if track else contextlib.nullcontext():
                leaves = [t.detach().requires_grad_(need and track)
                          for t, need in zip((q, k1, v1), ctx.needs_input_grad)]
                y_global = ops.causal_attention(*leaves, scale)
            if track:
                ctx.sdpa = (y_global, leaves)
            y_global = y_global.detach()
        g = gate.reshape(S, B, HQ).float().contiguous()
        y, diff, lse_g, lse_l = _launch_forward(q, k1, v1, k, v, g, y_global, scale, window)
        ctx.save_for_backward(q, k1, v1, k, v, g, y, diff, lse_g, lse_l)
        ctx.scale, ctx.window, ctx.gate_shape, ctx.gate_dtype = scale, window, gate.shape, \
            gate.dtype
        ctx.fused_global, ctx.window_backward = fused_global, window_backward
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k1, v1, k, v, g, y, diff, lse_g, lse_l = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        out = ctx.sdpa[0] if ctx.sdpa is not None else dy
        delta_g, delta_l, dgate, dy_global = _launch_backward_rows(
            dy, q, y, diff, g, ctx.fused_global, out)
        dq = dk1 = dv1 = None
        if ctx.sdpa is not None:  # SDPA's backward of loop 1's branch, from g * dy
            y_global, leaves = ctx.sdpa
            ctx.sdpa = None
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(y_global, wanted, dy_global))
            dq, dk1, dv1 = (next(grads) if t.requires_grad else None for t in leaves)
        dq, dk1_, dv1_, dk, dv = _launch_backward_blocks(
            dy, q, k1, v1, k, v, g, lse_g, lse_l, delta_g, delta_l, dq, ctx.scale, ctx.window,
            ctx.fused_global, ctx.window_backward, need[1] or need[2], need[3] or need[4])
        if ctx.fused_global:
            dk1, dv1 = dk1_, dv1_
        dgate = dgate.view(ctx.gate_shape).to(ctx.gate_dtype) if need[5] else None
        return (dq if need[0] else None, dk1, dv1, dk if need[3] else None,
                dv if need[4] else None, dgate, None, None, None, None, None)


# -- the same kernels as torch.library custom ops, for torch.compile -------------------------
# Opaque to dynamo and inductor (a Triton launch on the interpreter, or one inductor would not
# generate), with fake implementations giving the output shapes, so a compiled PLT layer
# keeps the kernel in one graph.  The sdpa branch is SDPA in the graph itself; its gradient
# meets the window branch's dQ in autograd's sum.


@torch.library.custom_op("plt_train::gswa_forward", mutates_args=())
def _gswa_forward_op(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, g: torch.Tensor, y_global: Optional[torch.Tensor],
                     scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k1, v1, k, v, g, y_global, scale, window)


@_gswa_forward_op.register_fake
def _(q, k1, v1, k, v, g, y_global, scale, window):
    y = q.new_empty(q.shape)
    lse_l = g.new_empty(g.shape)
    return y, torch.empty_like(y), lse_l.new_empty(g.shape if y_global is None else (0,)), lse_l


@torch.library.custom_op("plt_train::gswa_backward", mutates_args=())
def _gswa_backward_op(dy: torch.Tensor, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, y: torch.Tensor,
                      diff: torch.Tensor, lse_g: torch.Tensor, lse_l: torch.Tensor,
                      y_global: Optional[torch.Tensor], scale: float, window: int,
                      need_kv1: bool) -> list[torch.Tensor]:
    """(dq, dk1, dv1, dk, dv, dgate, dy_global); dK1/dV1 empty with ``sdpa`` (SDPA's own
    backward gives them) or without ``need_kv1``, dy_global empty with ``triton``."""
    fused_global = y_global is None
    dy = dy.contiguous()
    delta_g, delta_l, dgate, dy_global = _launch_backward_rows(
        dy, q, y, diff, g, fused_global, dy if fused_global else y_global)
    dq, dk1, dv1, dk, dv = _launch_backward_blocks(
        dy, q, k1, v1, k, v, g, lse_g, lse_l, delta_g, delta_l, None, scale, window,
        fused_global, WINDOW_BACKWARD, need_kv1, True)
    def empty():  # a new one per output: outputs may not alias each other
        return q.new_empty(0)

    return [dq, empty() if dk1 is None else dk1, empty() if dv1 is None else dv1, dk, dv, dgate,
            empty() if fused_global else dy_global]


@_gswa_backward_op.register_fake
def _(dy, q, k1, v1, k, v, g, y, diff, lse_g, lse_l, y_global, scale, window, need_kv1):
    kv1 = need_kv1 and y_global is None
    dy_global = q.new_empty(0) if y_global is None else torch.empty_strided(
        y_global.shape, y_global.stride(), dtype=dy.dtype, device=dy.device)
    return [q.new_empty(q.shape), k1.new_empty(k1.shape if kv1 else (0,)),
            v1.new_empty(v1.shape if kv1 else (0,)), k.new_empty(k.shape),
            v.new_empty(v.shape), g.new_empty(g.shape), dy_global]


def _gswa_setup(ctx, inputs, output):
    q, k1, v1, k, v, g, y_global, scale, window = inputs
    y, diff, lse_g, lse_l = output
    ctx.save_for_backward(q, k1, v1, k, v, g, y, diff, lse_g, lse_l, y_global)
    ctx.scale, ctx.window = scale, window


def _gswa_op_backward(ctx, dy, _ddiff, _dlse_g, _dlse_l):
    q, k1, v1, k, v, g, y, diff, lse_g, lse_l, y_global = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk1, dv1, dk, dv, dgate, dy_global = _gswa_backward_op(
        dy, q, k1, v1, k, v, g, y, diff, lse_g, lse_l, y_global, ctx.scale, ctx.window,
        y_global is None and (need[1] or need[2]))
    kv1 = y_global is None and (need[1] or need[2])
    return (dq, dk1 if kv1 else None, dv1 if kv1 else None, dk, dv, dgate,
            None if y_global is None else dy_global, None, None)


_gswa_forward_op.register_autograd(_gswa_op_backward, setup_context=_gswa_setup)


def _compiled_gswa(q, k1, v1, k, v, gate, scale: float, window: int, mode: str):
    """``gswa_attention`` under torch.compile: SDPA (``sdpa``) in the graph, the Triton parts
    as the custom ops above."""
    from plt_train.models.plt import ops

    S, B, HQ, _ = q.shape
    g = gate.reshape(S, B, HQ).float().contiguous()
    y_global = ops.causal_attention(q, k1, v1, scale) if mode == "sdpa" else None
    return _gswa_forward_op(q, k1, v1, k, v, g, y_global, scale, window)[0]


__all__ = ["fused_applies", "gswa_attention"]
