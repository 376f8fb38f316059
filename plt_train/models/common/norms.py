"""RMSNorm for megatron-core specs that also works with sequence parallelism.

megatron-core's local ``WrappedTorchNorm`` refuses ``sequence_parallel``
(docs/design/megatron-on-cpu.md), on GPU without TE/apex too.  The fix is only bookkeeping: with sequence parallel each TP rank sees
a slice of the sequence, so the norm weight's gradient is partial and must be all-reduced over
TP; megatron's ``finalize_model_grads`` does that for parameters marked ``sequence_parallel``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plt_train.models.common.params import param_device


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                      device=param_device(config)))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
