"""Looped decoders: ``vanilla``, ``looped`` and the Parallel Loop Transformer (``plt``).

- ``model.py``: the model (megatron-core GPTModel whose forward runs the shared block R times).
- ``attention.py``: the looped block's self-attention, with PLT's shared-KV G-SWA.
- ``gate.py``, ``ops.py``: G-SWA gates and the pure-torch attention / shift references.
- ``state.py``: the loop state the model shares with its attention layers.
- ``pipeline.py``: one virtual pipeline chunk per loop under pipeline parallelism.
- ``flops.py``: the FLOP count for MFU (every loop; window attention counted by its window)
  and the parameters per layer for the dry run.
- ``checks.py``: the looped models' config checks.
"""
from plt_train.models.plt.model import LOOPED, LoopedGPTModel


def build_looped(model, tconfig, vocab_size: int, backend: str) -> LoopedGPTModel:
    """The family's builder.  Looped models use the local spec on every backend: G-SWA and
    the loop state are ours (checks.py refuses model.backend=te)."""
    return LoopedGPTModel(model, tconfig, vocab_size)


__all__ = ["LOOPED", "LoopedGPTModel", "build_looped"]
