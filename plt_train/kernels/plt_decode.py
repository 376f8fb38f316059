"""PLT's decode-step attention for all R loop-rows of a layer in ONE Triton launch.

Reference (and fallback): ``plt_train.models.plt.ops.plt_decode_attention``.  Inputs:

- q [1, R*B, nq, d], loop-major rows (rows r*B .. r*B+B-1 are loop r+1);
- loop 1's full cache k_full/v_full [B, nk, S, d] and ``key_valid`` [B, S], which every row
  attends to;
- with G-SWA, the later loops' rolling windows k_win/v_win [R-1, B, nk, w, d] (slot ``t % w``
  holds position t), ``win_valid`` [B, w], and the gate [1, (R-1)*B, nq, 1] mixing
  ``g * y_global + (1 - g) * y_local`` for loops 2..R.

One program per (sequence, KV head, split) holds the R*group query rows of that KV head as
one tile, so each cached key and value is read once for the rows of every loop (the reason
to fuse: decode is bandwidth-bound).  ``cursor`` (a device scalar: the position being
decoded) bounds the scan to the written part of the cache without a host sync, so the same
launch replays in a CUDA graph as the cache grows.

Few programs would leave most of the GPU idle at batch 1, so the full cache is split over
``splits`` programs per (sequence, KV head); each writes its partial softmax state, and the
last to finish (an atomic counter per (sequence, KV head), reset by that program for the
next launch) merges them, attends to the windows and applies the gate: still one launch.

``tl.dot`` needs tiles of at least 16: the query tile is padded to 16 rows, head dims to a
power of two (masked, so any d works).  Triton's interpreter (CPU tests) mis-multiplies
bf16 tiles (3.9: integer garbage), so under the interpreter, and for fp32 inputs, the dots
run in fp32 (IEEE); on GPU bf16/fp16 tiles go to the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from plt_train.kernels import interpreting, max_rel_err, self_check_precision, use_triton, verified

# Finite "minus infinity" for running maxima: exp2(NEG - NEG) = 1, never NaN.  A constexpr:
# compiled Triton reads no other globals.
NEG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_ROWS = 128  # R * query heads per KV head in one tile


def kernel_applies(choice: str, q: torch.Tensor, k_full: torch.Tensor) -> bool:
    """Whether ``model.loop.kernel`` (``choice``) selects this kernel for these shapes;
    False means: use the reference.  ``choice="triton"`` raises where Triton cannot run;
    ``auto`` also wants the kernel to pass a first-use check against the reference on this
    device (``kernels.verified``), so a Triton version it was never run on falls back."""
    if not use_triton(choice, q.device):
        return False
    rows_per_kv_head = q.shape[1] // k_full.shape[0] * (q.shape[2] // k_full.shape[1])
    if q.shape[-1] > MAX_HEAD_DIM or rows_per_kv_head > MAX_ROWS or \
            q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return choice == "triton" or verified("plt_decode", q.device, _self_check)


def _self_check(device) -> bool:
    """R = 3, GQA, a ragged cache, left padding, in bf16 on GPU (fp32 in the interpreter),
    unsplit and split over 4 programs (the merge's atomics), against the fp32 reference."""
    from plt_train.models.plt import ops

    dtype, tol = self_check_precision(device)
    g = torch.Generator(device=device).manual_seed(0)
    B, R, nk, group, d, S, w, cursor = 2, 3, 2, 4, 64, 300, 16, 250

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    valid[:, :cursor + 1] = True
    valid[1, :37] = False
    inputs = dict(q=randn(1, R * B, nk * group, d), k_full=randn(B, nk, S, d),
                  v_full=randn(B, nk, S, d), key_valid=valid, scale=d ** -0.5,
                  k_win=randn(R - 1, B, nk, w, d), v_win=randn(R - 1, B, nk, w, d),
                  win_valid=torch.ones(B, w, dtype=torch.bool, device=device),
                  gate=torch.rand(1, (R - 1) * B, nk * group, 1, generator=g,
                                  device=device).to(dtype))
    want = ops.plt_decode_attention(**{k: v.float() if torch.is_tensor(v) and
                                       v.is_floating_point() else v for k, v in inputs.items()})
    at = torch.tensor([cursor], device=device)
    return all(max_rel_err(plt_decode_attention(**inputs, cursor=at, splits=splits), want)
               < tol for splits in (1, 4))


def plt_decode_attention(q, k_full, v_full, key_valid, scale: float, k_win=None, v_win=None,
                         win_valid=None, gate=None, cursor=None, *, block_n: int = 64,
                         splits: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Same arguments and result as ``ops.plt_decode_attention`` (k_win/v_win stacked over
    the later loops), plus ``cursor``: a one-element integer tensor, the position being
    decoded; keys after it are skipped (the caller guarantees they are invalid).

    ``splits``: programs per (sequence, KV head) over the full cache (default: enough to
    fill the GPU, ``default_splits``).  ``block_n`` / ``num_warps``: untuned (sm_90, d=128,
    4 warps, as the JIT specialises it: 128 registers, at most 4 bytes of spills, 70 KB of
    shared memory, 3 blocks per SM; ``scripts/kernel_resources.py``)."""
    B, nk, S, d = k_full.shape
    rows, nq = q.shape[1], q.shape[2]
    loops, group = rows // B, nq // nk
    if rows != loops * B or nq != group * nk or v_full.shape != k_full.shape:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k_full {tuple(k_full.shape)}")
    q, k_full, v_full, key_valid = (_unit_last_stride(t) for t in (q, k_full, v_full, key_valid))
    if k_full.stride() != v_full.stride():  # the kernel walks both with K's strides
        k_full, v_full = k_full.contiguous(), v_full.contiguous()
    has_window = gate is not None and loops > 1
    if has_window:
        k_win, v_win, win_valid = k_win.contiguous(), v_win.contiguous(), win_valid.contiguous()
        win_len = k_win.shape[3]
        gate = gate.reshape(gate.shape[1], nq)
    else:  # unused pointers
        k_win = v_win = win_valid = gate = k_full
        win_len = 1
    out = torch.empty_like(q)
    rows_pad = max(16, triton.next_power_of_2(loops * group))
    d_pad = max(16, triton.next_power_of_2(d))
    splits = splits or default_splits(B * nk, S, block_n, q.device)
    splits = max(1, min(splits, triton.cdiv(S, block_n)))
    if splits > 1:
        partial_acc = torch.empty(B * nk * splits, rows_pad, d_pad, dtype=torch.float32,
                                  device=q.device)
        partial_ml = torch.empty(B * nk * splits, 2, rows_pad, dtype=torch.float32,
                                 device=q.device)
        counters = _counters(q.device, B * nk)
    else:
        partial_acc = partial_ml = counters = out
    f32_dots = interpreting() or q.dtype == torch.float32
    _plt_decode_kernel[(B, nk, splits)](
        q, k_full, v_full, key_valid, k_win, v_win, win_valid, gate, out,
        cursor if cursor is not None else out, partial_acc, partial_ml, counters,
        S, win_len, scale * LOG2E,
        q.stride(1), q.stride(2), k_full.stride(0), k_full.stride(1), k_full.stride(2),
        key_valid.stride(0), k_win.stride(0), k_win.stride(1), k_win.stride(2),
        k_win.stride(3), win_valid.stride(0), gate.stride(0), gate.stride(1),
        out.stride(1), out.stride(2),
        LOOPS=loops, GROUP=group, ROWS=rows_pad, D=d, D_PAD=d_pad, BLOCK_N=block_n,
        BLOCK_W=min(64, max(16, triton.next_power_of_2((loops - 1) * win_len))),
        SPLITS=splits, HAS_WINDOW=has_window, HAS_CURSOR=cursor is not None,
        F32_DOTS=f32_dots, num_warps=num_warps)
    return out


def default_splits(programs: int, cache_len: int, block_n: int, device) -> int:
    """Enough programs to fill the GPU at small batch, at least two key blocks each."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), cache_len // (2 * block_n)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_COUNTERS: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, allocated once per device (each launch leaves them
    zero again), so a launch adds no memset and a CUDA graph can hold their address.  Split
    launches on one device must therefore not overlap (decode runs on one stream)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("plt_decode: run one eager step before capturing a CUDA graph "
                               "(its counters are allocated outside the graph)")
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _dot(a, b, F32_DOTS: tl.constexpr):
    if F32_DOTS:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _softmax_step(scores, keep, v, m, l, acc, F32_DOTS: tl.constexpr):
    """One key block of online softmax: scores [ROWS, N] (log2 domain), keep [ROWS, N]."""
    scores = tl.where(keep, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32_DOTS)
    return m_new, l, acc


@triton.jit
def _window_gate_store(q, y_global, rows, row_loop, row_head, row_ok, dcol, d_ok, b, h, B,
                       KW, VW, WVALID, GATE, OUT, win_len, qk_scale,
                       s_wl, s_wb, s_wh, s_ws, s_wvb, s_gr, s_gh, s_or, s_oh,
                       LOOPS: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK_W: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       F32_DOTS: tl.constexpr):
    """Rows of loops >= 2 attend to their own loop's window; mix with the gate; store."""
    y = y_global
    if HAS_WINDOW:
        m = tl.full([ROWS], NEG, tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D_PAD], tl.float32)
        n_win = (LOOPS - 1) * win_len  # the windows of all later loops, one after another
        offs = tl.arange(0, BLOCK_W)
        for start in range(0, n_win, BLOCK_W):
            j = start + offs
            in_range = j < n_win
            key_loop = j // win_len + 1
            slot = j % win_len
            slot_ok = tl.load(WVALID + b * s_wvb + slot, mask=in_range, other=0) != 0
            at = (key_loop - 1) * s_wl + b * s_wb + h * s_wh + slot * s_ws
            kv_mask = in_range[:, None] & d_ok[None, :]
            k = tl.load(KW + at[:, None] + dcol[None, :], mask=kv_mask, other=0.0)
            v = tl.load(VW + at[:, None] + dcol[None, :], mask=kv_mask, other=0.0)
            scores = _dot(q, tl.trans(k), F32_DOTS) * qk_scale
            keep = (row_loop[:, None] == key_loop[None, :]) & slot_ok[None, :]
            m, l, acc = _softmax_step(scores, keep, v, m, l, acc, F32_DOTS)
        y_local = acc / tl.where(l > 0, l, 1.0)[:, None]  # loop 1's rows: no window, unused
        gate_at = ((row_loop - 1) * B + b) * s_gr + row_head * s_gh
        g = tl.load(GATE + gate_at, mask=row_ok & (row_loop > 0), other=1.0).to(tl.float32)
        y = g[:, None] * y_global + (1.0 - g[:, None]) * y_local
    out_at = (row_loop * B + b) * s_or + row_head * s_oh
    tl.store(OUT + out_at[:, None] + dcol[None, :], y.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _plt_decode_kernel(
        Q, KF, VF, VALID, KW, VW, WVALID, GATE, OUT, CURSOR, PART_ACC, PART_ML, COUNTERS,
        S, win_len, qk_scale,
        s_qr, s_qh, s_fb, s_fh, s_fs, s_vb, s_wl, s_wb, s_wh, s_ws, s_wvb, s_gr, s_gh,
        s_or, s_oh,
        LOOPS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
        SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CURSOR: tl.constexpr,
        F32_DOTS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    B = tl.num_programs(0)
    NK = tl.num_programs(1)
    # The tile's rows: row i is loop i // GROUP, query head h * GROUP + i % GROUP.
    rows = tl.arange(0, ROWS)
    row_loop = rows // GROUP
    row_head = h * GROUP + rows % GROUP
    row_ok = rows < LOOPS * GROUP
    dcol = tl.arange(0, D_PAD)
    d_ok = dcol < D
    q_at = (row_loop * B + b) * s_qr + row_head * s_qh
    q = tl.load(Q + q_at[:, None] + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)

    # Loop 1's full cache, this split's share of the written positions.
    if HAS_CURSOR:
        n_keys = tl.minimum(tl.load(CURSOR).to(tl.int32) + 1, S)
    else:
        n_keys = S
    per_split = tl.cdiv(tl.cdiv(n_keys, BLOCK_N), SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)
    m = tl.full([ROWS], NEG, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    k_base = KF + b * s_fb + h * s_fh
    v_base = VF + b * s_fb + h * s_fh
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs
        in_range = pos < hi
        key_ok = tl.load(VALID + b * s_vb + pos, mask=in_range, other=0) != 0
        kv_mask = in_range[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos[:, None] * s_fs + dcol[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + pos[:, None] * s_fs + dcol[None, :], mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k), F32_DOTS) * qk_scale
        m, l, acc = _softmax_step(scores, key_ok[None, :], v, m, l, acc, F32_DOTS)

    if SPLITS == 1:
        _window_gate_store(q, acc / l[:, None], rows, row_loop, row_head, row_ok, dcol, d_ok,
                           b, h, B, KW, VW, WVALID, GATE, OUT, win_len, qk_scale,
                           s_wl, s_wb, s_wh, s_ws, s_wvb, s_gr, s_gh, s_or, s_oh,
                           LOOPS, ROWS, D_PAD, BLOCK_W, HAS_WINDOW, F32_DOTS)
    else:
        # Leave this split's softmax state; the last split of (b, h) to arrive merges them.
        head = b * NK + h
        mine = head * SPLITS + split
        tile = rows[:, None] * D_PAD + dcol[None, :]
        tl.store(PART_ACC + mine * ROWS * D_PAD + tile, acc)
        tl.store(PART_ML + mine * 2 * ROWS + rows, m)
        tl.store(PART_ML + mine * 2 * ROWS + ROWS + rows, l)
        tl.debug_barrier()  # every thread's stores before the (release) arrival
        arrived = tl.atomic_add(COUNTERS + head, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            m_all = tl.full([ROWS], NEG, tl.float32)
            l_all = tl.zeros([ROWS], tl.float32)
            acc_all = tl.zeros([ROWS, D_PAD], tl.float32)
            for other in range(SPLITS):
                at = head * SPLITS + other
                # .cg: read from L2, where the other programs' stores are, not a stale L1.
                m_s = tl.load(PART_ML + at * 2 * ROWS + rows, cache_modifier=".cg")
                l_s = tl.load(PART_ML + at * 2 * ROWS + ROWS + rows, cache_modifier=".cg")
                acc_s = tl.load(PART_ACC + at * ROWS * D_PAD + tile, cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_s)
                alpha = tl.exp2(m_all - m_new)
                beta = tl.exp2(m_s - m_new)
                l_all = l_all * alpha + l_s * beta
                acc_all = acc_all * alpha[:, None] + acc_s * beta[:, None]
                m_all = m_new
            tl.store(COUNTERS + head, 0)  # ready for the next launch / graph replay
            _window_gate_store(q, acc_all / l_all[:, None], rows, row_loop, row_head, row_ok,
                               dcol, d_ok, b, h, B, KW, VW, WVALID, GATE, OUT, win_len,
                               qk_scale, s_wl, s_wb, s_wh, s_ws, s_wvb, s_gr, s_gh, s_or, s_oh,
                               LOOPS, ROWS, D_PAD, BLOCK_W, HAS_WINDOW, F32_DOTS)
