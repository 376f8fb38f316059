"""G-SWA's per-head gate: ``y = g * y_global + (1 - g) * y_local``, ``g = sigmoid(.)``.

Two variants exist in released PLT code (docs/design/architectures.md); both are
zero-initialised, so training starts from an even blend:

- ``query`` (our default): ``g_h = sigmoid(q_h . w_h + b_h)`` from the post-RoPE query of head
  h.  It costs 2*d FLOPs per head and token and needs no extra input, so it stays on the
  heads' tensor-parallel rank and in the decode step's rows at no cost.
- ``input``: ``g = sigmoid(Linear(RMSNorm(layer input)))``, one output per head; the normed
  layer input is what the attention module receives.  A column-parallel linear splits it by
  heads across TP ranks.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from plt_train.config.schema import GateInput, ModelConfig
from plt_train.models.common.params import param_device


class QueryGate(MegatronModule):
    def __init__(self, config, heads_per_partition: int, head_dim: int):
        super().__init__(config=config)
        dtype, device = config.params_dtype, param_device(config)
        self.weight = torch.nn.Parameter(torch.zeros(heads_per_partition, head_dim, dtype=dtype,
                                                       device=device))
        self.bias = torch.nn.Parameter(torch.zeros(heads_per_partition, dtype=dtype, device=device))
        for p in (self.weight, self.bias):  # split by heads, like the QKV projection
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1

    def forward(self, query: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """query [s, b, heads, d] -> gate [s, b, heads, 1]."""
        logits = (query * self.weight).sum(-1) + self.bias
        return torch.sigmoid(logits).unsqueeze(-1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0, "bias": 0},
                                                   sharded_offsets)


class InputGate(MegatronModule):
    def __init__(self, config, heads_per_partition: int, head_dim: int):
        super().__init__(config=config)
        self.heads = heads_per_partition
        self.linear = ColumnParallelLinear(
            config.hidden_size, config.num_attention_heads, config=config,
            init_method=torch.nn.init.zeros_, bias=True, gather_output=False,
            skip_bias_add=False)

    def forward(self, query: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        logits, _ = self.linear(hidden_states)  # [s, b, heads] (SP: gathered along s)
        return torch.sigmoid(logits).unsqueeze(-1)


GATES = {GateInput.query: QueryGate, GateInput.input: InputGate}


def gate_parameters(model: ModelConfig) -> int:
    """Parameters of one layer's gate (split by heads over TP ranks), 0 without G-SWA."""
    if not model.uses_gswa:
        return 0
    heads = model.num_attention_heads
    per_head = model.hidden_size if model.loop.gate == GateInput.input else model.head_dim
    return per_head * heads + heads  # weights and biases
