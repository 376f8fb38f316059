"""Mixture-of-experts MLPs: the fine-grained (CDAC) baseline and BigMac (DCCA).

Every decoder builder asks ``mlp_spec`` (or ``moe_spec``, None for dense, where the backend's
own MLP is kept) for its MLP, so any model (GPT, looped, PLT) gets MoE layers from
``model.moe`` without knowing about them.

    accounting.py  all-to-all bytes / time counters (measured at the call)
    checks.py      the model.moe checks of a run's config (before any process group)
    config.py      model.moe -> TransformerConfig fields
    experts.py     grouped-GEMM experts (torch._grouped_mm; per-expert loop reference; TE)
    layer.py       FineGrainedMoE and BigMacMoE on megatron-core's MoELayer
    metrics.py     the per-step metrics of a model's MoE layers (bytes, time, aux losses)
    flops.py       MoE FLOPs and parameters (active experts only) and the paper's Table 3
    wire.py        the all-to-all's number format (native, bf16, fp8)
"""
from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from plt_train.config.schema import ExpertGemm, MLPLayer, ModelConfig


def experts_spec(model: ModelConfig) -> ModuleSpec:
    """Routed experts: fine_grained ``h -> r*h -> h``, bigmac ``r*h -> h -> r*h``."""
    from plt_train.models.common.backends import resolve_backend
    from plt_train.models.moe.experts import GroupedExperts, TEExperts

    moe, h, w = model.moe, model.hidden_size, model.expert_width
    sizes = dict(input_size=h, hidden_size=w) if moe.layer == MLPLayer.fine_grained else \
        dict(input_size=w, hidden_size=h)
    use_te = moe.expert_gemm == ExpertGemm.te or (moe.expert_gemm == ExpertGemm.auto
                                                  and resolve_backend(model.backend) == "te")
    if use_te:
        return ModuleSpec(module=TEExperts, params={**sizes, "activation": moe.activation})
    return ModuleSpec(module=GroupedExperts,
                      params={**sizes, "activation": moe.activation, "gemm": moe.expert_gemm})


def mlp_spec(model: ModelConfig) -> ModuleSpec:
    """The MLP ``ModuleSpec`` of every decoder layer for ``model.moe.layer`` (the local dense
    MLP for ``dense``)."""
    from plt_train.models.gpt.specs import local_mlp_spec

    return moe_spec(model) or local_mlp_spec()


def moe_spec(model: ModelConfig) -> ModuleSpec | None:
    """The MoE layer's ``ModuleSpec``, or None for a dense model, whose MLP is then the
    backend's own (TE fuses its norm into the first linear)."""
    layer = model.moe.layer
    if layer == MLPLayer.dense:
        return None
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from plt_train.models.common.linear import RowParallelLinear
    from plt_train.models.moe.layer import BigMacMoE, FineGrainedMoE, Router

    shared = None
    if model.moe.num_shared_experts:
        shared = ModuleSpec(module=SharedExpertMLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    submodules = MoESubmodules(experts=experts_spec(model), shared_experts=shared, router=Router)
    params = {"wire_format": model.moe.wire_format, "dcca_kernel": model.moe.dcca_kernel}
    if layer == MLPLayer.fine_grained:
        return ModuleSpec(module=FineGrainedMoE, submodules=submodules, params=params)
    return ModuleSpec(module=BigMacMoE, submodules=submodules,
                      params={"latent_size": model.expert_width, **params})


__all__ = ["experts_spec", "mlp_spec", "moe_spec"]
