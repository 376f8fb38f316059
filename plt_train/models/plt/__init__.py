"""Looped decoders: ``vanilla``, ``looped`` and the Parallel Loop Transformer (``plt``).

- ``model.py``: the model (megatron-core GPTModel whose forward runs the shared block R times).
- ``attention.py``: the looped block's self-attention, with PLT's shared-KV G-SWA.
- ``gate.py``, ``ops.py``: G-SWA gates and the pure-torch attention / shift references.
- ``state.py``: the loop state the model shares with its attention layers.
- ``flops.py``: the FLOP count for MFU (every loop; window attention counted by its window).
"""
from plt_train.models.plt.model import KINDS, LoopedGPTModel


def build_looped(kind: str):
    def build(model, tconfig, vocab_size: int, backend: str) -> LoopedGPTModel:
        # Looped models use the local spec on every backend: G-SWA and the loop state are ours.
        return LoopedGPTModel(model, tconfig, vocab_size, kind)
    return build


__all__ = ["KINDS", "LoopedGPTModel", "build_looped"]
