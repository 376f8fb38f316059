"""Attention primitives of the looped decoders, in megatron's [seq, batch, heads, dim] layout.

These are the pure-torch references that fused kernels (plt_train/kernels/) must reproduce.  All of
them call ``F.scaled_dot_product_attention`` with ``enable_gqa`` so grouped K/V heads are
never expanded.

``key_valid`` [b, sk] marks real keys (False for left padding in batched inference).  A query
whose every key is masked would give NaN (softmax of all -inf), and 0 * NaN poisons the
values of every other query, so a padded query always sees itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, scale: float, mask=None, causal: bool = False):
    """q [sq, b, nq, d], k/v [sk, b, nk, d] -> [sq, b, nq, d]."""
    qt, kt, vt = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=qt.shape[1] != kt.shape[1])
    return out.permute(2, 0, 1, 3)


def _band(sq: int, sk: int, window: Optional[int], device) -> torch.Tensor:
    """[sq, sk] bool: causal (query i sees keys j <= i), limited to j > i - window."""
    i = torch.arange(sq, device=device).view(-1, 1) + (sk - sq)
    j = torch.arange(sk, device=device).view(1, -1)
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def _with_padding(keep: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """[sq, sk] x [b, sk] -> [b, 1, sq, sk]; a padded query keeps its own key (no NaN)."""
    if key_valid is None:
        return keep.view(1, 1, *keep.shape)
    sq, sk = keep.shape
    mask = keep.unsqueeze(0) & key_valid[:, None, :]
    own = torch.zeros_like(keep)
    own[torch.arange(sq), torch.arange(sk - sq, sk)] = True
    return (mask | own.unsqueeze(0)).unsqueeze(1)


def causal_attention(q, k, v, scale: float, key_valid: Optional[torch.Tensor] = None):
    """Full causal attention (loop 1, vanilla and looped models, PLT's global branch)."""
    if key_valid is None:
        return _sdpa(q, k, v, scale, causal=True)
    keep = _band(q.shape[0], k.shape[0], None, q.device)
    return _sdpa(q, k, v, scale, mask=_with_padding(keep, key_valid))


def window_attention(q, k, v, scale: float, window: int,
                     key_valid: Optional[torch.Tensor] = None):
    """Causal sliding-window attention: query i sees keys i-window+1 .. i (G-SWA's local
    branch).  Reference implementation: it materialises a [sq, sk] boolean mask."""
    keep = _band(q.shape[0], k.shape[0], window, q.device)
    return _sdpa(q, k, v, scale, mask=_with_padding(keep, key_valid))


def cached_attention(q, k, v, scale: float, key_valid: torch.Tensor):
    """One decode position against a cache: q [1, b, nq, d], k/v [b, nk, sk, d] (cache layout,
    heads before positions), key_valid [b, sk].  Every valid cached key is visible."""
    qt = q.permute(1, 2, 0, 3)
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=key_valid[:, None, None, :],
                                         scale=scale, enable_gqa=qt.shape[1] != k.shape[1])
    return out.permute(2, 0, 1, 3)


def gswa(q, k_shared, v_shared, k, v, gate, scale: float, window: int,
         key_valid: Optional[torch.Tensor] = None):
    """G-SWA of loops r >= 2: ``gate * causal(q, loop 1's K/V) + (1 - gate) * window(q, own
    K/V)``, gate [s, b, nq, 1] (or [s, b, nq]).  The reference for plt_train/kernels/gswa.py."""
    if gate.dim() == q.dim() - 1:
        gate = gate.unsqueeze(-1)
    y_global = causal_attention(q, k_shared, v_shared, scale, key_valid)
    y_local = window_attention(q, k, v, scale, window, key_valid)
    return gate * y_global + (1 - gate) * y_local


def shift_one(h: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-loop shift: out[i] = h[i-1], out[0] = 0 (h is [s, b, hidden]).

    With left padding the first real token also gets 0, since its predecessor is padding.
    """
    out = torch.cat([torch.zeros_like(h[:1]), h[:-1]], dim=0)
    if key_valid is not None:
        prev_valid = torch.cat([torch.zeros_like(key_valid[:, :1]), key_valid[:, :-1]], dim=1)
        out = out * prev_valid.t().unsqueeze(-1).to(out.dtype)
    return out


def rows_as_heads_attention(q, k, v, scale: float, key_valid: torch.Tensor):
    """All row groups of a decode step against ONE cache in one attention call.

    q [1, n*b, nq, d] (n loop-major groups of b rows), k/v [b, nk, sk, d] -> [1, n*b, nq, d].
    The n rows of a sequence become extra query heads of their KV group: one query per head
    keeps the fast single-query decode path of SDPA on GPU (docs/design/kernels.md: 9 us for
    1 row, 29 us for 2-3 rows as extra queries, 9 us folded into heads)."""
    _, rows, nq, d = q.shape
    b, nk = k.shape[:2]
    n = rows // b
    qf = q.view(n, b, nk, nq // nk, d).permute(1, 2, 3, 0, 4).reshape(1, b, nq * n, d)
    out = cached_attention(qf, k, v, scale, key_valid)
    return out.view(b, nk, nq // nk, n, d).permute(3, 0, 1, 2, 4).reshape(1, rows, nq, d)


def plt_decode_attention(q, k_full, v_full, key_valid, scale: float, k_win=None, v_win=None,
                         win_valid=None, gate=None):
    """PLT's decode-step attention for the rows of all loops: the reference that
    ``plt_train/kernels/plt_decode.py`` must reproduce (and the fallback where it does not run).

    q [1, n*b, nq, d]: n loop-major groups of b rows (group 0 = loop 1).  Every row attends
    to loop 1's full cache k_full/v_full [b, nk, S, d] (``key_valid`` [b, S]).  With G-SWA
    (``gate`` given), row group i >= 1 also attends to its loop's rolling window
    k_win/v_win[i-1] [b, nk, w, d] (``win_valid`` [b, w]) and mixes per head:
    ``gate * y_global + (1 - gate) * y_local``, gate [1, (n-1)*b, nq, 1].
    """
    y = rows_as_heads_attention(q, k_full, v_full, scale, key_valid)
    if gate is None:
        return y
    b = k_full.shape[0]
    n = q.shape[1] // b
    y_local = torch.cat([cached_attention(q[:, i * b:(i + 1) * b], k_win[i - 1], v_win[i - 1],
                                          scale, win_valid) for i in range(1, n)], dim=1)
    return torch.cat([y[:, :b], gate * y[:, b:] + (1 - gate) * y_local], dim=1)
