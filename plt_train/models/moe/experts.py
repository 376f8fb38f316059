"""Routed experts on plain torch: one grouped GEMM per matrix, or one matmul per expert.

megatron-core 0.16.1's own expert modules cannot run here: ``GroupedMLP`` needs the
``grouped_gemm`` CUDA package, ``TEGroupedMLP`` needs Transformer Engine, and ``SequentialMLP``
goes through the router's TE-only GEMM path (docs/design/megatron-on-cpu.md).
``GroupedExperts`` is the replacement: ``num_local_experts`` MLPs ``in -> hidden -> in`` stored
as stacked weights

    linear_fc1.weight  [E_local, in, hidden]      (relu)     or [E_local, in, 2*hidden] (swiglu:
                                                                gate | up, concatenated)
    linear_fc2.weight  [E_local, hidden, in]

so one ``torch._grouped_mm(x, w, offs)`` computes every local expert on its contiguous block
of tokens (the dispatcher sorts tokens by local expert).  ``torch._grouped_mm`` runs on CPU
(fp32 and bf16) and on Hopper GPUs (bf16 only, 16-byte aligned strides); elsewhere ``loop``
(one matmul per expert, the reference the tests compare against) is used.

* fine_grained experts: in = h, hidden = r*h  (``h -> r*h -> h``)
* bigmac experts:       in = r*h, hidden = h  (``r*h -> h -> r*h``): same parameters and
  FLOPs per token as a fine-grained expert, as in the paper.

Gate probabilities are NOT applied here: the dispatcher applies them at the source rank after
the combine (``layer.py``), so only hidden states travel.  Expert weights are marked
``allreduce=False`` (megatron DDP reduces their gradients over the expert-data-parallel group)
and their checkpoint keys carry the GLOBAL expert index as an offset, so EP=1/2/4 layouts load
and initialise (``models/init.py``) identical weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from plt_train.config.schema import ExpertActivation, ExpertGemm
from plt_train.models.common.params import param_device



def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: CPU (fp32/bf16) or CUDA sm90+ bf16,
    every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch's meta (tracing) kernel of _grouped_mm takes bf16 only
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0
                                            for w in weights)


def _offsets(tokens_per_expert: torch.Tensor, device) -> torch.Tensor:
    return torch.cumsum(tokens_per_expert.to(torch.long), 0).to(torch.int32).to(device)


class _Weight(torch.nn.Module):
    """Holds one stacked expert weight so its state-dict key reads ``linear_fc1.weight``."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


class GroupedExperts(MegatronModule):
    """``num_local_experts`` MLPs ``input_size -> hidden_size -> input_size`` (no biases).

    ``forward(tokens, tokens_per_expert, probs=None)`` takes tokens sorted by local expert and
    returns ``(outputs, None)`` like megatron's expert modules.  ``probs`` is ignored (applied
    after the combine) but accepted for interface compatibility.
    """

    def __init__(self, num_local_experts: int, config, pg_collection=None, *, input_size: int,
                 hidden_size: int, activation: str = "swiglu", gemm: str = "auto"):
        super().__init__(config=config)
        activation, gemm = ExpertActivation(activation), ExpertGemm(gemm)
        if gemm == ExpertGemm.te:
            raise ValueError(f"GroupedExperts gemm must be auto, grouped or loop, not {gemm!r}")
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.input_size, self.hidden_size = input_size, hidden_size
        self.activation, self.gemm = activation, gemm
        self.ep_group, self.dp_group = pg_collection.ep, pg_collection.expt_dp
        fc1_out = 2 * hidden_size if activation == ExpertActivation.swiglu else hidden_size
        dtype, device = config.params_dtype, param_device(config)
        self.linear_fc1 = _Weight((num_local_experts, input_size, fc1_out), dtype, device)
        self.linear_fc2 = _Weight((num_local_experts, hidden_size, input_size), dtype, device)
        for p in (self.linear_fc1.weight, self.linear_fc2.weight):
            p.allreduce = False  # expert parallel: reduced over the expert-data-parallel group
            # Not a TP duplicate: every rank's copy counts in the grad norm (megatron's experts
            # are tensor-parallel layers of an expert-TP group of size 1; same attributes).
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1
            with torch.no_grad():
                p.normal_(0.0, config.init_method_std)  # replaced by models/init.py in training

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU fused like megatron's dense MLP under ``config.bias_activation_fusion``
        (``model.swiglu_fusion``): one kernel each way, each reading its inputs once and
        writing its output once, where eager chunk / silu / mul and their autograd run six
        kernels and move 2.25x the bytes of ``h`` [routed rows, 2 * hidden] (BigMac's
        widest tensor: hidden = h, not r*h; docs/benchmarks.md)."""
        if self.activation == ExpertActivation.swiglu:
            if self.config.bias_activation_fusion and h.numel():  # (no compile for 0 rows)
                from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
                return bias_swiglu_impl(h, None)
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.relu(h)

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.gemm == ExpertGemm.loop:
            return False
        ok = grouped_mm_supported(x, self.linear_fc1.weight, self.linear_fc2.weight)
        if self.gemm == ExpertGemm.grouped and not ok:
            raise RuntimeError(f"torch._grouped_mm does not take {x.dtype} on {x.device} with "
                               f"these shapes; use model.moe.expert_gemm=loop")
        return ok

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor,
                probs: Optional[torch.Tensor] = None):
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        if self.use_grouped(tokens) and tokens.shape[0] > 0:
            offs = _offsets(tokens_per_expert, tokens.device)
            h = self._act(torch._grouped_mm(tokens, w1, offs=offs))
            return torch._grouped_mm(h.contiguous(), w2, offs=offs), None
        counts = [int(n) for n in tokens_per_expert.tolist()]
        outs = [self._act(chunk @ w1[i]) @ w2[i]
                for i, chunk in enumerate(torch.split(tokens, counts, dim=0))]
        return torch.cat(outs, dim=0), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """Stacked weights as ONE sharded tensor each, whose first real axis is the global
        expert index (offset ``ep_rank * E_local`` of ``E_global``); replicated over the
        expert-data-parallel group (replica id = its rank)."""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        npre = len(sharded_offsets)
        out = {}
        for name in ("linear_fc1", "linear_fc2"):
            key = f"{prefix}{name}.weight"
            out[key] = ShardedTensor.from_rank_offsets(
                key, getattr(self, name).weight, *sharded_offsets, (npre, ep_rank, ep_size),
                replica_id=(0, 0, self.dp_group.rank()), prepend_axis_num=npre)
        return out


class TEExperts(MegatronModule):
    """megatron-core's ``TEGroupedMLP`` (Transformer Engine grouped GEMM) behind the same
    interface: used only with ``model.moe.expert_gemm=te`` (or ``auto`` with TE installed and
    the TE backend active).  NOT exercised by any test: no machine of this project has TE.
    For bigmac the expert sizes are passed through megatron's ``moe_latent_size`` (input
    r*h) and ``moe_ffn_hidden_size`` (hidden h) on a private config copy."""

    def __init__(self, num_local_experts: int, config, pg_collection=None, *, input_size: int,
                 hidden_size: int, activation: str = "swiglu"):
        import copy

        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear, TERowParallelGroupedLinear,
        )
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        super().__init__(config=config)
        cfg = copy.copy(config)
        cfg.moe_ffn_hidden_size = hidden_size
        cfg.moe_latent_size = None if input_size == config.hidden_size else input_size
        cfg.gated_linear_unit = activation == "swiglu"
        cfg.activation_func = F.silu if activation == "swiglu" else F.relu
        self.inner = TEGroupedMLP(num_local_experts, cfg, MLPSubmodules(
            linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear),
            pg_collection=pg_collection)

    def forward(self, tokens, tokens_per_expert, probs=None):
        ones = torch.ones(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        return self.inner(tokens, tokens_per_expert, ones)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self.inner.sharded_state_dict(prefix, sharded_offsets, metadata)
