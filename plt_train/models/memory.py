"""Measuring the activation memory a forward pass leaves for the backward pass.

``saved_activation_bytes`` counts what autograd's saved-tensor hooks see while ``fn`` runs:
every tensor any backward node saves (megatron's checkpoint functions included), each
storage once, the parameters' storages left out (weights are not activations).  On CPU this is
exact bookkeeping, not an allocator reading, so it is what ``scripts/bench_memory.py``
compares ``plt-dryrun``'s estimate with, and what the recompute tests check shrinks.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch


def saved_activation_bytes(fn: Callable[[], torch.Tensor],
                           parameters=()) -> tuple[int, torch.Tensor]:
    """Run ``fn()`` and return (bytes saved for backward when it returns, its result).

    Each storage counts once, at its size when ``fn`` returns (megatron's
    ``CheckpointWithoutOutput`` empties a saved norm output after the forward pass and
    refills it before the backward pass); a storage belonging to one of ``parameters`` does
    not count, nor does one whose saving nodes were already freed (a branch of the graph the
    result does not depend on)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, list] = {}  # data pointer at save time -> weak references to the tensors

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            refs = saved.setdefault(ptr, [])
            if refs and all(r() is None for r in refs):  # memory freed and reused
                refs.clear()
            refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = 0
    for refs in saved.values():
        alive = [r() for r in refs if r() is not None]
        if alive:
            total += alive[0].untyped_storage().nbytes()
    return total, result
