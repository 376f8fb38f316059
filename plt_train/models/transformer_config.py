"""The one translation from our typed config to megatron-core's ``TransformerConfig``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plt_train.config.schema import ModelConfig, ParallelConfig, Recompute, Switch
from plt_train.models.moe.config import moe_transformer_kwargs


def to_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                          device_kwargs: dict):
    """``device_kwargs``: the switches that depend on the device
    (``runtime.device.megatron_device_kwargs``); ``model.swiglu_fusion`` other than auto
    overrides the device's choice of fused SwiGLU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    device_kwargs = dict(device_kwargs)
    if model.swiglu_fusion != Switch.auto:
        device_kwargs["bias_activation_fusion"] = model.swiglu_fusion == Switch.on
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Loss = sum over tokens / tokens in the global batch, whatever the DP/micro-batching.
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=True,
        **recompute_kwargs(model),
        **moe_transformer_kwargs(model),
        **device_kwargs,
    )


def recompute_kwargs(model: ModelConfig) -> dict:
    """``model.recompute`` as megatron-core's fields.  The gpt model's ``TransformerBlock``
    reads them as they are; looped models run their layers themselves and read
    ``recompute_granularity`` / ``recompute_num_layers`` in ``models/plt/recompute.py``
    (selective recompute happens inside the layers for every model)."""
    rc = model.recompute
    if rc.granularity == Recompute.none:
        return {}
    if rc.granularity == Recompute.selective:
        return dict(recompute_granularity="selective", recompute_modules=list(rc.modules))
    if rc.num_layers is None:  # every layer, each its own unit
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    return dict(recompute_granularity="full", recompute_method="block",
                recompute_num_layers=rc.num_layers)
