"""BigMac's DCCA dispatch and combine, fused around the permutation into expert order; and
the gate-weighted combine alone, which replaces megatron's ``unpermute`` in either MoE layer.

Unfused, the layer computes ``latent = x W_down^T`` [T, r*h], then megatron's ``permute``
copies it row by row into expert-sorted order (``index_select``), and after the combine
all-to-all ``unpermute`` multiplies every row by its gate probability (an fp32 copy), sums the
rows of each token (``scatter_add``), and ``linear_ascend`` maps the sum back to width h.  Here:

* ``descend_permute``: one Triton GEMM computes each tile of ``x W_down^T`` once and stores it
  straight to the token's destination rows (one per routed expert): the reduced-width tokens
  are written once, in the order the dispatch all-to-all sends them; no latent tensor, no
  ``index_select``.  Backward: ``g[t] = sum_k dout[dest[t, k]]`` (a gather-sum kernel), then
  ``dx = g W_down`` and ``dW_down = g^T x`` (cuBLAS).
* ``combine_ascend``: a gather kernel ``c[t] = sum_k p[t, k] y[dest[t, k]]`` (fp32
  accumulation, no scaled copy of ``y``), then ``c W_up^T`` in cuBLAS.  Fusing that GEMM into
  the gather would re-gather the K rows of each token once per output tile of W_up (h / BLOCK_N
  times): cuBLAS on the small ``c`` is cheaper.  Backward: ``dc = dout W_up`` and
  ``dW_up = dout^T c`` (cuBLAS), then ONE kernel writes ``dy[dest[t, k]] = p[t, k] dc[t]`` and
  ``dp[t, k] = <y[dest[t, k]], dc[t]>``.

* ``combine``: the gather-sum of ``combine_ascend`` without the GEMM, for the fine-grained
  (CDAC) layer, which combines at full width: megatron's ``unpermute`` makes an fp32 scaled
  copy of every expert output and ``scatter_add``s it (atomics on CUDA, so the order of the K
  additions varies run to run); this reads each row once, adds in slot order, and its
  backward is the same one-kernel ``dy`` / ``dp`` as ``combine_ascend``'s with ``dc = dout``.

All take ``dest`` [T, K] (int32): the row of the permuted tensor that holds token t's k-th
routed expert, -1 where that assignment was dropped (capacity factor).  ``expert_slots`` builds
it from megatron's routing map, in megatron's order (expert-major, token order within an
expert: ``permute``'s ``sorted_indices``), without a host sync.  Each row is the destination of
at most one slot.  ``*_reference`` are the same maps in plain torch (``index_add`` /
``index_select``): the tests' ground truth and the path for inputs the kernels do not take.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from plt_train.kernels import (gpu_tiles, interpreting, max_rel_err, self_check_precision,
                     triton_unusable_reason)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- routing metadata ------------------------------------------------------------------------
def expert_slots(routing_map: torch.Tensor, probs: torch.Tensor, top_k: int):
    """``(dest [T, K] int32, slot_probs [T, K] fp32)`` from megatron's routing map [T, E]
    (bool) and gate probabilities [T, E].

    ``dest[t, k]`` is the row of megatron's ``permute`` output holding (t, e) for token t's
    k-th routed expert e (in expert order), i.e. ``sorted_indices[dest[t, k]] == t``: the rank
    of (e, t) among the routed pairs, expert-major.  Tokens with fewer than K routed experts
    (dropped by the capacity factor) get -1 and probability 0 in the free slots.  All on the
    device (cumsums and a scatter-add), no host sync.  Needs at most K routed experts per
    token: true of megatron's top-k routing with or without dropping, not of
    ``moe_pad_expert_input_to_capacity`` or router padding for quantisation.
    ``slot_probs`` is differentiable: its gradient flows back to ``probs`` at (t, e).
    """
    routed = routing_map.bool()
    num_tokens, num_experts = routed.shape
    row = routed.t().reshape(-1).cumsum(0).view(num_experts, num_tokens).t() - 1
    # Slot k of each routed pair; unrouted pairs spill into an extra column K, dropped after.
    slot = torch.where(routed, routed.cumsum(1) - 1, top_k)
    zeros = torch.zeros(num_tokens, top_k + 1, dtype=torch.long, device=routed.device)
    # scatter_add of (value + 1) onto zeros: exactly one pair lands in each filled slot, so the
    # sum is that pair's value + 1; empty slots stay 0, i.e. -1.  Deterministic (integers).
    dest = zeros.scatter_add(1, slot, torch.where(routed, row + 1, 0))[:, :top_k] - 1
    experts = torch.arange(1, num_experts + 1, device=routed.device).expand(num_tokens, -1)
    expert = zeros.scatter_add(1, slot, torch.where(routed, experts, 0))[:, :top_k] - 1
    slot_probs = torch.where(dest >= 0, probs.gather(1, expert.clamp(min=0)).float(), 0.0)
    return dest.to(torch.int32), slot_probs


# -- references ------------------------------------------------------------------------------
def descend_permute_reference(x, w_down, dest, n_out: int):
    """``out[dest[t, k]] = x[t] W_down^T``; rows no slot names stay zero."""
    latent = F.linear(x, w_down)
    top_k = dest.shape[1]
    rows = torch.where(dest >= 0, dest, n_out).reshape(-1).long()  # dropped -> spill row
    out = latent.new_zeros(n_out + 1, latent.shape[1])
    return out.index_add(0, rows, latent.repeat_interleave(top_k, dim=0))[:n_out]


def combine_reference(y, slot_probs, dest):
    """``sum_k p[t, k] y[dest[t, k]]``, the sum in fp32 rounded to y's dtype (what megatron's
    ``unpermute`` with fp32 probabilities does)."""
    num_tokens, top_k = dest.shape
    y_pad = torch.cat([y, y.new_zeros(1, y.shape[1])])  # row n_out: the dropped slots' zeros
    rows = torch.where(dest >= 0, dest, y.shape[0]).reshape(-1).long()
    gathered = y_pad.index_select(0, rows).view(num_tokens, top_k, -1).float()
    weights = torch.where(dest >= 0, slot_probs.float(), 0.0)
    return (gathered * weights.unsqueeze(-1)).sum(1).to(y.dtype)


def combine_ascend_reference(y, slot_probs, dest, w_up):
    """``combine_reference`` then ``W_up``."""
    return F.linear(combine_reference(y, slot_probs, dest), w_up)


# -- public ops ------------------------------------------------------------------------------
def descend_permute(x, w_down, dest, n_out: int, rows_covered: bool = False):
    """x [T, h], w_down [r*h, h], dest [T, K] -> [n_out, r*h] in expert order (module doc).

    ``rows_covered``: every row in [0, n_out) is some slot's destination (``expert_slots``'
    dest with n_out routed pairs), so the output is allocated uninitialised and written once;
    otherwise it is zero-filled first.  Inputs the kernel does not take use the reference."""
    if not _kernel_takes(x, w_down):
        return descend_permute_reference(x, w_down, dest, n_out)
    return _descend_permute_op(x, w_down, dest.contiguous(), int(n_out), rows_covered)


def combine_ascend(y, slot_probs, dest, w_up, rows_covered: bool = False):
    """y [n_out, r*h] (expert order), slot_probs / dest [T, K], w_up [h, r*h] -> [T, h].
    ``rows_covered`` as for ``descend_permute`` (then ``dy`` needs no zero fill)."""
    if not _kernel_takes(y, w_up):
        return combine_ascend_reference(y, slot_probs, dest, w_up)
    return _combined(y, slot_probs, dest, w_up, rows_covered)


def combine(y, slot_probs, dest, rows_covered: bool = False):
    """y [n_out, N] (expert order), slot_probs / dest [T, K] -> [T, N]: the gate-weighted
    un-permutation (megatron's ``unpermute``), ``combine_ascend`` without the projection."""
    if not _kernel_takes(y, y):
        return combine_reference(y, slot_probs, dest)
    return _combined(y, slot_probs, dest, None, rows_covered)


def self_check(device) -> bool:
    """The first-use check of ``kernels.verified`` that ``auto`` requires: the three ops
    forward + backward at a small ragged shape, bf16 on GPU (fp32 on CPU), against the fp32
    references."""
    dtype, tol = self_check_precision(device)
    shape = (300, 256, 64, 8, 2) if device.type == "cuda" else (37, 32, 16, 4, 2)
    return check_error(device, dtype, *shape) < tol


def check_error(device, dtype, T: int, h: int, rh: int, E: int, K: int) -> float:
    """Largest relative error (max |kernel - reference| / max |reference|) over the three ops'
    outputs and input gradients, the kernels in ``dtype`` and the references in fp32, with
    top-K routing over E experts and one token whose assignments are all dropped; inf if
    anything is not finite."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, generator=g, device=device)
    top = logits.topk(K, dim=1).indices
    routing = torch.zeros(T, E, dtype=torch.bool, device=device).scatter(1, top, True)
    routing[0] = False
    dest, slot_probs = expert_slots(routing, logits.softmax(-1), K)
    n_out = int(routing.sum())
    ts = [torch.randn(*shape, generator=g, device=device).to(dtype) * scale
          for shape, scale in (((T, h), 1.0), ((rh, h), h ** -0.5), ((n_out, rh), 1.0),
                               ((h, rh), rh ** -0.5))]
    dz = torch.randn(n_out, rh, generator=g, device=device).to(dtype)
    dout = torch.randn(T, h, generator=g, device=device).to(dtype)
    dcomb = torch.randn(T, rh, generator=g, device=device).to(dtype)

    def run(fns, inputs, p):
        x, w_down, y, w_up = inputs
        z = fns[0](x, w_down, dest, n_out)
        out = fns[1](y, p, dest, w_up)
        comb = fns[2](y, p, dest)
        return [z, out, comb, *torch.autograd.grad((z, out, comb), (*inputs, p),
                                                    (dz, dout, dcomb))]

    with torch.enable_grad():
        got = run((descend_permute, combine_ascend, combine),
                  [t.clone().requires_grad_(True) for t in ts],
                  slot_probs.clone().requires_grad_(True))
        want = run((descend_permute_reference, combine_ascend_reference, combine_reference),
                   [t.float().requires_grad_(True) for t in ts],
                   slot_probs.clone().requires_grad_(True))
    return max_rel_err(got, want)


def _kernel_takes(x, w) -> bool:
    return x.dtype in DTYPES and w.dtype == x.dtype and triton_unusable_reason(x.device) is None


# -- kernels ---------------------------------------------------------------------------------
@triton.jit
def _descend_permute_kernel(X, W, DEST, OUT, T, N, KDIM, sxt, sxk, swn, swk, sot,
                            TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr, PREC: tl.constexpr,
                            UPCAST: tl.constexpr):
    """One [BLOCK_T, BLOCK_N] tile of x W^T, stored to each token's destination rows.
    UPCAST (interpreter, bf16 only): Triton's interpreter multiplies bfloat16 dot operands
    wrongly (numpy has no bfloat16; measured: garbage of order 1e10), so there the operands
    are widened to fp32 first; the loads, the fp32 accumulation and the bf16 stores are the
    compiled kernel's."""
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BLOCK_T)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_T token tiles sweep the columns together (W tiles stay in L2).
    per_group = GROUP_T * tiles_n
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(tiles_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    n_mask = offs_n < N
    x_ptrs = X + offs_t[:, None].to(tl.int64) * sxt + offs_k[None, :] * sxk
    w_ptrs = W + offs_n[None, :].to(tl.int64) * swn + offs_k[:, None] * swk  # [K, N]: W^T
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        k_mask = (k0 + offs_k) < KDIM
        a = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    tile = acc.to(OUT.dtype.element_ty)
    for k in tl.static_range(TOPK):
        row = tl.load(DEST + offs_t * TOPK + k, mask=t_mask, other=-1)
        keep = (row >= 0)[:, None] & n_mask[None, :]
        tl.store(OUT + row[:, None].to(tl.int64) * sot + offs_n[None, :], tile, mask=keep)


@triton.jit
def _gather_sum_kernel(SRC, DEST, P, OUT, T, N, sst, sot, TOPK: tl.constexpr,
                       WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[t] = sum_k (p[t, k] *) src[dest[t, k]]`` in fp32, stored in out's dtype."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        row = tl.load(DEST + offs_t * TOPK + k, mask=t_mask, other=-1)
        keep = (row >= 0)[:, None] & n_mask[None, :]
        vals = tl.load(SRC + row[:, None].to(tl.int64) * sst + offs_n[None, :], mask=keep,
                       other=0.0).to(tl.float32)
        if WEIGHTED:
            p = tl.load(P + offs_t * TOPK + k, mask=t_mask, other=0.0)
            vals = vals * p[:, None]
        acc += vals
    out = OUT + offs_t[:, None].to(tl.int64) * sot + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_backward_kernel(Y, DC, P, DEST, DY, DP, T, N, syt, sct, sdt,
                             TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dy[dest[t, k]] = p[t, k] dc[t]`` and ``dp[t, k] = <y[dest[t, k]], dc[t]>``: each
    program owns whole tokens, so the dot products need no atomics."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    slots = tl.arange(0, TOPK_PAD)
    dp = tl.zeros([BLOCK_T, TOPK_PAD], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dc = tl.load(DC + offs_t[:, None].to(tl.int64) * sct + offs_n[None, :],
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        for k in tl.static_range(TOPK):
            row = tl.load(DEST + offs_t * TOPK + k, mask=t_mask, other=-1)
            p = tl.load(P + offs_t * TOPK + k, mask=t_mask, other=0.0)
            keep = (row >= 0)[:, None] & n_mask[None, :]
            rows = row[:, None].to(tl.int64)
            y = tl.load(Y + rows * syt + offs_n[None, :], mask=keep, other=0.0).to(tl.float32)
            tl.store(DY + rows * sdt + offs_n[None, :],
                     (dc * p[:, None]).to(DY.dtype.element_ty), mask=keep)
            dp += tl.where(slots[None, :] == k, tl.sum(y * dc, axis=1)[:, None], 0.0)
    tl.store(DP + offs_t[:, None] * TOPK + slots[None, :], dp,
             mask=t_mask[:, None] & (slots[None, :] < TOPK))


# -- launch ----------------------------------------------------------------------------------
def _gemm_blocks(x: torch.Tensor) -> dict:
    """Tile sizes.  The interpreter runs small tiles (fewer numpy ops per test); on GPU the
    Triton matmul tutorial's Hopper-friendly choices (fp32 runs IEEE dots: smaller tiles)."""
    if not gpu_tiles(x):
        return dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, GROUP_T=2, num_warps=1, num_stages=1)
    if x.dtype == torch.float32:
        return dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, GROUP_T=8, num_warps=4, num_stages=3)
    return dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3)


def _row_blocks(t: torch.Tensor, width: int) -> tuple:
    """(BLOCK_T, BLOCK_N, num_warps) of the memory-bound gather kernels."""
    gpu = gpu_tiles(t)
    block_n = min(triton.next_power_of_2(max(width, 16)), 128 if gpu else 64)
    return (32 if gpu else 16), block_n, (4 if gpu else 1)


def _precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 like torch's default matmul


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _gather_sum(src, dest, slot_probs, out_dtype):
    """[T, N] = sum over each token's K slots of src rows (weighted by slot_probs if given)."""
    src = _unit_rows(src)
    num_tokens, top_k = dest.shape
    width = src.shape[1]
    out = torch.empty(num_tokens, width, dtype=out_dtype, device=src.device)
    if num_tokens == 0 or width == 0:
        return out.zero_()
    block_t, block_n, warps = _row_blocks(src, width)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_n))
    weights = slot_probs if slot_probs is not None else dest  # unused when not WEIGHTED
    _gather_sum_kernel[grid](src, dest, weights, out, num_tokens, width, src.stride(0),
                             out.stride(0), TOPK=top_k, WEIGHTED=slot_probs is not None,
                             BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps)
    return out


def _new_rows(n: int, width: int, like: torch.Tensor, rows_covered: bool) -> torch.Tensor:
    make = torch.empty if rows_covered else torch.zeros
    return make(n, width, dtype=like.dtype, device=like.device)


# -- the ops: torch.library custom ops, so torch.compile keeps them in its graph (opaque
# launches with fake implementations for the shapes) -----------------------------------------
@torch.library.custom_op("plt_train::descend_permute", mutates_args=())
def _descend_permute_op(x: torch.Tensor, w_down: torch.Tensor, dest: torch.Tensor, n_out: int,
                        rows_covered: bool) -> torch.Tensor:
    num_tokens, top_k = dest.shape
    latent, hidden = w_down.shape
    out = _new_rows(n_out, latent, x, rows_covered)
    if num_tokens and latent and n_out:
        cfg = _gemm_blocks(x)
        tiles = triton.cdiv(num_tokens, cfg["BLOCK_T"]) * triton.cdiv(latent, cfg["BLOCK_N"])
        _descend_permute_kernel[(tiles,)](
            x, w_down, dest, out, num_tokens, latent, hidden, x.stride(0), x.stride(1),
            w_down.stride(0), w_down.stride(1), out.stride(0), TOPK=top_k,
            PREC=_precision(x.dtype), UPCAST=interpreting() and x.dtype == torch.bfloat16,
            **cfg)
    return out


@_descend_permute_op.register_fake
def _(x, w_down, dest, n_out, rows_covered):
    return x.new_empty(n_out, w_down.shape[0])


def _descend_permute_setup(ctx, inputs, output):
    x, w_down, dest, _, _ = inputs
    ctx.save_for_backward(x, w_down, dest)


def _descend_permute_backward(ctx, dout):
    x, w_down, dest = ctx.saved_tensors
    grad = _gather_sum_op(dout, dest, None)  # [T, r*h]: d latent
    dx = grad @ w_down if ctx.needs_input_grad[0] else None
    dw = grad.t() @ x if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None


_descend_permute_op.register_autograd(_descend_permute_backward,
                                      setup_context=_descend_permute_setup)


@torch.library.custom_op("plt_train::gather_sum", mutates_args=())
def _gather_sum_op(src: torch.Tensor, dest: torch.Tensor,
                   slot_probs: Optional[torch.Tensor]) -> torch.Tensor:
    """[T, N] = sum over each token's K slots of ``src`` rows, weighted by ``slot_probs``
    (fp32, contiguous) if given."""
    return _gather_sum(src, dest, slot_probs, src.dtype)


@_gather_sum_op.register_fake
def _(src, dest, slot_probs):
    return src.new_empty(dest.shape[0], src.shape[1])


@torch.library.custom_op("plt_train::combine_backward", mutates_args=())
def _combine_backward_op(y: torch.Tensor, dc: torch.Tensor, slot_probs: torch.Tensor,
                         dest: torch.Tensor, rows_covered: bool) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(dy [n_out, N], dprobs [T, K] fp32) of the gate-weighted gather-sum, from its output's
    gradient ``dc`` [T, N]."""
    y, dc = _unit_rows(y), _unit_rows(dc)
    num_tokens, top_k = dest.shape
    dy = _new_rows(y.shape[0], y.shape[1], y, rows_covered)
    dprobs = torch.zeros(num_tokens, top_k, dtype=torch.float32, device=y.device)
    if num_tokens and y.shape[1]:
        block_t, block_n, warps = _row_blocks(y, y.shape[1])
        _combine_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
            y, dc, slot_probs, dest, dy, dprobs, num_tokens, y.shape[1], y.stride(0),
            dc.stride(0), dy.stride(0), TOPK=top_k, TOPK_PAD=triton.next_power_of_2(top_k),
            BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps)
    return dy, dprobs


@_combine_backward_op.register_fake
def _(y, dc, slot_probs, dest, rows_covered):
    return y.new_empty(y.shape), slot_probs.new_empty(dest.shape)


@torch.library.custom_op("plt_train::combine", mutates_args=())
def _combine_op(y: torch.Tensor, slot_probs: torch.Tensor, dest: torch.Tensor,
                rows_covered: bool) -> torch.Tensor:
    """The gate-weighted gather-sum with its own backward (``_combine_backward_op``);
    ``slot_probs`` fp32, ``dest`` contiguous."""
    return _gather_sum(y, dest, slot_probs, y.dtype)


@_combine_op.register_fake
def _(y, slot_probs, dest, rows_covered):
    return y.new_empty(dest.shape[0], y.shape[1])


def _combine_setup(ctx, inputs, output):
    y, slot_probs, dest, rows_covered = inputs
    ctx.save_for_backward(y, slot_probs, dest)
    ctx.rows_covered = rows_covered


def _combine_op_backward(ctx, dc):
    y, slot_probs, dest = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None
    dy, dprobs = _combine_backward_op(y, dc, slot_probs, dest, ctx.rows_covered)
    return dy, dprobs, None, None


_combine_op.register_autograd(_combine_op_backward, setup_context=_combine_setup)


def _combined(y, slot_probs, dest, w_up, rows_covered):
    """``combine`` / ``combine_ascend`` through the ops: the projection is a plain matmul
    (its gradient is autograd's)."""
    out = _combine_op(y, slot_probs.float().contiguous(), dest.contiguous(), rows_covered)
    return out if w_up is None else out @ w_up.t()


__all__ = ["combine", "combine_ascend", "combine_ascend_reference", "combine_reference",
           "descend_permute", "descend_permute_reference", "expert_slots"]
