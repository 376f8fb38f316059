"""KV caches for the looped decoders: full caches and rolling-window caches.

- ``vanilla``: one full cache per layer.
- ``looped``: one full cache per layer and loop (R x vanilla), since loop r's queries need
  loop r's keys at every earlier position.
- ``plt``: loop 1's full cache per layer, shared by every loop, plus for each later loop a
  rolling cache of its last ``w`` positions per layer (G-SWA's local branch).  So
  ``kv_bytes(plt) / kv_bytes(vanilla) = 1 + (R-1) * w / S`` for S cached positions.

Layout: ``[batch, kv_heads, positions, head_dim]`` (SDPA's).  Batched prompts are left-padded;
``valid`` [batch, positions] marks real tokens.  Position ``t = length`` is the one being
decoded; the generator marks it valid before the pass and calls ``advance`` after it.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, batch: int, max_len: int, layer_numbers, kv_heads: int,
                 head_dim: int, full_loops, window_loops=(), window: int = 0,
                 dtype=torch.float32, device="cpu"):
        def zeros(n):
            return torch.zeros(batch, kv_heads, n, head_dim, dtype=dtype, device=device)

        self.max_len, self.window, self.length = max_len, window, 0
        self.full_loops = set(full_loops)
        self.full = {(r, l): (zeros(max_len), zeros(max_len))
                     for r in full_loops for l in layer_numbers}
        self.win = {(r, l): (zeros(window), zeros(window))
                    for r in window_loops for l in layer_numbers}
        self.win_valid = {r: torch.zeros(batch, window, dtype=torch.bool, device=device)
                          for r in window_loops}
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)

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
        for dst, src in zip(self.win[(loop, layer)], (k, v)):
            dst[:, :, slots] = src[positions].permute(1, 2, 0, 3)
        self.win_valid[loop][:, slots] = self.valid[:, positions]

    # -- decode: one position per sequence, [1, b, heads, dim] ------------------------------
    def append_full(self, loop: int, layer: int, k, v) -> None:
        for dst, src in zip(self.full[(loop, layer)], (k, v)):
            dst[:, :, self.length] = src[0]

    def append_window(self, loop: int, layer: int, k, v) -> None:
        slot = self.length % self.window
        for dst, src in zip(self.win[(loop, layer)], (k, v)):
            dst[:, :, slot] = src[0]
        self.win_valid[loop][:, slot] = self.valid[:, self.length]

    def full_view(self, loop: int, layer: int):
        """The whole preallocated cache; positions not written yet are invalid.  A fixed
        shape on every step: on GPU a growing key length made cuDNN's SDPA build a new plan
        per step (2.7 ms of host time per call on an H200, measured), and fixed shapes are
        what CUDA graphs need."""
        k, v = self.full[(loop, layer)]
        return k, v, self.valid

    def window_view(self, loop: int, layer: int):
        k, v = self.win[(loop, layer)]
        return k, v, self.win_valid[loop]

    def advance(self, n: int = 1) -> None:
        self.length += n
        if self.length > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
