"""``model.moe`` -> megatron-core ``TransformerConfig`` fields (no process groups needed)."""
from __future__ import annotations

from plt_train.config.schema import MLPLayer, ModelConfig


def moe_transformer_kwargs(model: ModelConfig) -> dict:
    """The MoE fields of ``TransformerConfig`` for ``model.moe`` (empty for dense).

    Router and loss settings are megatron-core's own (``TopKRouter`` reads them); expert tensor
    parallelism is always 1 (our experts are not TP-sharded); no TE fusions (``*_fusion``), so
    the same code runs on CPU and GPU.
    """
    moe = model.moe
    if moe.layer == MLPLayer.dense:
        return {}
    width = model.expert_width
    return dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=width,
        moe_router_topk=moe.top_k,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy="probs",
        moe_pad_expert_input_to_capacity=False,
        moe_router_score_function=str(moe.router_score_function),
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_shared_expert_intermediate_size=(moe.num_shared_experts * width
                                             if moe.num_shared_experts else None),
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_tensor_parallel_size=1,
    )
