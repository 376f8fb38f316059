"""KV caches for the looped decoders: full caches and rolling-window caches.

- ``vanilla``: one full cache per layer.
- ``looped``: one full cache per layer and loop (R x vanilla), since loop r's queries need
  loop r's keys at every earlier position.
- ``plt``: loop 1's full cache per layer, shared by every loop, plus for each later loop a
  rolling cache of its last ``w`` positions per layer (G-SWA's local branch).  So
  ``kv_bytes(plt) / kv_bytes(vanilla) = 1 + (R-1) * w / S`` for S cached positions.  The
  windows of all later loops of a layer are one tensor [R-1, batch, kv_heads, w, head_dim],
  so one kernel launch can read them all (plt_train/kernels/plt_decode.py).
- ``plt`` with ``model.loop.shared_kv=false`` (cross-loop parallelism alone): a full cache
  per layer and loop, like ``looped`` (R x vanilla), but all loops still decode in one pass.

Layout: ``[batch, kv_heads, positions, head_dim]`` (SDPA's).  Batched prompts are left-padded;
``valid`` [batch, positions] marks real tokens.  Position ``t = length`` is the one being
decoded.  A decode step touches the cache only through device tensors (``cursor`` holds
``length``; writes are ``index_copy_`` at it), so it has no host sync and fixed addresses and
can be captured in a CUDA graph; ``begin_step`` marks the position valid, the step appends
K/V, and ``advance`` (outside any graph) moves both counters on.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, batch: int, max_len: int, layer_numbers, kv_heads: int,
                 head_dim: int, full_loops, window_loops=(), window: int = 0,
                 dtype=torch.float32, device="cpu"):
        def zeros(*lead, n):
            return torch.zeros(*lead, batch, kv_heads, n, head_dim, dtype=dtype, device=device)

        self.max_len, self.window, self.length = max_len, window, 0
        self.full_loops = set(full_loops)
        self.window_loops = list(window_loops)  # loop of each window's index: 1 .. R-1
        self.full = {(r, l): (zeros(n=max_len), zeros(n=max_len))
                     for r in full_loops for l in layer_numbers}
        self.win = {l: (zeros(len(self.window_loops), n=window),
                        zeros(len(self.window_loops), n=window))
                    for l in layer_numbers} if self.window_loops else {}
        # Which window slots hold a real token (the same for every later loop).
        self.win_valid = torch.zeros(batch, window, dtype=torch.bool, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # == length
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # == length % window

    def kv_bytes(self) -> int:
        """Bytes held for keys and values (masks excluded)."""
        return sum(t.numel() * t.element_size()
                   for kv in (*self.full.values(), *self.win.values()) for t in kv)

    def has_full(self, loop: int) -> bool:
        return loop in self.full_loops

    # -- prefill: whole sequences in attention layout [s, b, heads, dim] ---------------------
    def store_full(self, loop: int, layer: int, k, v) -> None:
        s = k.shape[0]
        for dst, src in zip(self.full[(loop, layer)], (k, v)):
            dst[:, :, :s] = src.permute(1, 2, 0, 3)

    def store_window(self, loop: int, layer: int, k, v) -> None:
        """Keep the last ``window`` positions, each in slot ``position % window``."""
        s = k.shape[0]
        positions = torch.arange(max(0, s - self.window), s, device=k.device)
        slots = positions % self.window
        i = self.window_loops.index(loop)
        for dst, src in zip(self.win[layer], (k, v)):
            dst[i][:, :, slots] = src[positions].permute(1, 2, 0, 3)
        self.win_valid[:, slots] = self.valid[:, positions]

    # -- decode: one position per sequence, [1, rows, heads, dim]; device indices only -------
    def check_room(self) -> None:
        """Refuse a decode step past ``max_len`` before it writes anything: its writes would
        index out of range (a device-side assert inside a CUDA graph).  ``length`` is the
        host's copy of ``cursor``, so no sync."""
        if self.length >= self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")

    def begin_step(self) -> None:
        """Mark the position being decoded (``cursor``) as a real token of every sequence,
        in the full mask and in its window slot."""
        self.valid.index_fill_(1, self.cursor, True)
        if self.window:
            torch.remainder(self.cursor, self.window, out=self.slot)
            self.win_valid.index_fill_(1, self.slot, True)

    def append_full(self, loop: int, layer: int, k, v) -> None:
        """k/v [1, b, kv_heads, d] at position ``cursor``."""
        for dst, src in zip(self.full[(loop, layer)], (k, v)):
            dst.index_copy_(2, self.cursor, src[0].unsqueeze(2))

    def append_windows(self, layer: int, k, v) -> None:
        """k/v [1, n*b, kv_heads, d]: rows of the first n later loops (loop-major), each into
        its loop's window at slot ``cursor % window``."""
        for dst, src in zip(self.win[layer], (k, v)):
            n = src.shape[1] // dst.shape[1]
            rows = src[0].reshape(n, dst.shape[1], *src.shape[2:]).unsqueeze(3)
            dst[:n].index_copy_(3, self.slot, rows)

    def full_view(self, loop: int, layer: int):
        """The whole preallocated cache; positions not written yet are invalid.  A fixed
        shape on every step: on GPU a growing key length made cuDNN's SDPA build a new plan
        per step (2.7 ms of host time per call on an H200, measured), and fixed shapes are
        what CUDA graphs need."""
        k, v = self.full[(loop, layer)]
        return k, v, self.valid

    def windows(self, layer: int, n: int):
        """The first n later loops' windows of ``layer``: k, v [n, b, kv_heads, w, d] and
        the slot mask [b, w]."""
        k, v = self.win[layer]
        return k[:n], v[:n], self.win_valid

    def advance(self, n: int = 1) -> None:
        self.length += n
        if self.length > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        self.cursor.fill_(self.length)  # no host sync: a scalar fill
