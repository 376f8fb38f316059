"""Weight initialisation that does not depend on the parallel layout.

megatron-core draws initial weights from the RNG stream in construction order, so a pipeline
stage that builds layers 2-3 draws different numbers than a single process that built layers
0-1 first.  Here every parameter is drawn from a generator seeded by (seed, its global
checkpoint key, its offset in stacked dimensions), in its *global* shape, and each rank copies
out its own shard.  So TP=2, PP=2 and the single process start from the same model, which is
what makes our parity tests meaningful (torchtitan solves the same problem with a seed
checkpoint).

Rules (GPT-2 / Megatron-LM): normal(0, std) for weights, std / sqrt(2 * num_layers) for the
output projections of each residual branch, ones for norm weights, zeros for parameters whose
key contains one of ``_ZERO_INIT`` (PLT's G-SWA gates start at sigmoid(0) = an even blend).
"""
from __future__ import annotations

import math
import zlib

import torch

# BigMac's ascend projection ends its residual branch too (scaled like megatron-core's latent
# MoE output projection).
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight", "linear_ascend.weight")
_ZERO_INIT = ("gswa_gate",)


def _iter_sharded_tensors(sharded):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _iter_sharded_tensors(built if isinstance(built, dict) else {0: built})
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, dict):
            yield from _iter_sharded_tensors(value)
        elif isinstance(value, (list, tuple)):
            yield from _iter_sharded_tensors(dict(enumerate(value)))


def _seed_for(seed: int, key: str, prepend_offsets: tuple) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{key}|{prepend_offsets}".encode())) % (2**63)


@torch.no_grad()
def init_weights(model_chunks, seed: int, std: float, num_layers: int) -> None:
    """Initialise every parameter of ``model_chunks`` (megatron modules) in place."""
    params = {id(p) for chunk in model_chunks for p in chunk.parameters()}
    done: set[int] = set()
    for chunk in model_chunks:
        for st in _iter_sharded_tensors(chunk.sharded_state_dict()):
            data = st.data
            base = data._base if data._base is not None else data
            if id(base) not in params and id(data) not in params:
                continue  # buffers (e.g. extra state) are not parameters
            npre = st.prepend_axis_num
            pre_offsets = tuple(st.global_offset[:npre])
            shape = st.global_shape[npre:]
            if any(z in st.key for z in _ZERO_INIT):
                data.zero_()
            elif st.key.endswith("norm.weight") or "layer_norm" in st.key or len(shape) == 1:
                data.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * num_layers) if st.key.endswith(_RESIDUAL_OUTPUTS) else std
                gen = torch.Generator().manual_seed(_seed_for(seed, st.key, pre_offsets))
                full = torch.empty(shape, dtype=torch.float32).normal_(0.0, scale, generator=gen)
                index = tuple(slice(o, o + n) for o, n in
                              zip(st.global_offset[npre:], st.local_shape))
                data.copy_(full[index].view(data.shape))
            done.add(id(base))
            done.add(id(data))
    missing = [n for c in model_chunks for n, p in c.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"init_weights: no checkpoint key for parameters {missing}")
