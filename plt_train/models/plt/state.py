"""What a looped block's attention layers need to know while the model runs.

The model owns one ``LoopState`` and hands the same object to every ``LoopAttention`` it
builds; before each pass through the shared block it says which loop (or, in one-pass
decoding, which loops: one per row group) is running.  This keeps the layer signatures those
of megatron-core's ``TransformerLayer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class LoopState:
    # Loop index (0-based) of each row group in the batch dimension of the current pass.
    # Training and prefill run one loop at a time: [r].  PLT's one-pass decode: [0, 1, ..., R-1],
    # the batch dimension holding R groups of B sequences (loop-major).
    row_loops: list = field(default_factory=lambda: [0])
    # PLT: loop 1's (K, V) queued per (layer number, later loop); each later loop pops its own
    # (one entry per sequence / micro-batch in flight).
    shared_kv: dict = field(default_factory=dict)
    key_valid: Optional[torch.Tensor] = None  # [b, s] real tokens (batched inference)
    cache: Optional[object] = None  # inference.KVCache during prefill and decode
    decoding: bool = False  # one new position per sequence against the cache
    # Pipeline parallel: each loop is its own virtual chunk with its own backward pass
    # (pipeline.py), so gradients into loop 1's K/V are handed over by a hook (attention.py).
    # Set by the model when it is built with PP > 1 and R > 1.
    split_loops: bool = False
    # A layer being run under full recompute (recompute.py): {layer number: (K, V)} handed
    # between the layer's attention and the recompute wrapper instead of the queues above:
    # loop 1 leaves its K/V here, a later loop finds loop 1's here.  None otherwise.
    held: Optional[dict] = None

    def begin(self, loop: int = 0, *, key_valid=None, cache=None, decoding=False) -> None:
        self.row_loops = [loop]
        self.key_valid, self.cache, self.decoding = key_valid, cache, decoding
