"""A fix to megatron-core 0.16.1's layernorm recompute, on CPU and GPU alike (a bug in the
package, not a CPU workaround).

``CheckpointWithoutOutput.__init__(fp8=False)`` sets ``self.fp8 = fp8 is not None``, which is
True for the default ``False``; ``TransformerLayer`` builds it with no argument for
``recompute_modules: [layernorm]``, so every layernorm recompute takes the FP8 branch and calls
Transformer Engine's ``FP8GlobalStateManager``: a NameError wherever TE is not installed.  We
keep megatron's class and read the argument as meant (``bool(fp8)``).  Applied once, by
``build_model``; idempotent.
"""
from __future__ import annotations


def fix_checkpoint_without_output() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    if getattr(cls, "_plt_train_fixed", False):
        return
    shipped = cls.__init__

    def __init__(self, fp8=False):
        shipped(self, fp8=fp8)
        self.fp8 = bool(fp8)

    cls.__init__ = __init__
    cls._plt_train_fixed = True
