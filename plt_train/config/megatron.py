"""The one translation from our typed config to megatron-core's ``TransformerConfig``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plt_train.config.schema import ModelConfig, ParallelConfig


SWIGLU_FUSIONS = ("auto", "on", "off")


def swiglu_ffn_size(hidden_size: int) -> int:
    """Llama's rule: 2/3 of 4h (equal parameters to a 4h GELU MLP), rounded up to 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


def ffn_size(model: ModelConfig) -> int:
    return model.ffn_hidden_size or swiglu_ffn_size(model.hidden_size)


def padded_vocab_size(vocab_size: int, model: ModelConfig) -> int:
    """Pad to a multiple of ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM we do not multiply the multiple by the TP size: the model (and so a
    checkpoint) stays the same whatever the parallel layout.  Validation checks that the padded
    size divides by TP instead.

    ``model.vocab_size``, when set, replaces the tokenizer's ``vocab_size`` before padding
    (room for tokens added later); it may not be smaller.
    """
    if model.vocab_size is not None:
        if model.vocab_size < vocab_size:
            raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({vocab_size}): raise it or use null")
        vocab_size = model.vocab_size
    m = model.make_vocab_size_divisible_by
    return m * math.ceil(vocab_size / m)


def to_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                          device_kwargs: dict):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from plt_train.models.moe.config import moe_transformer_kwargs  # here: no import cycle

    bf16 = dtype == torch.bfloat16
    device_kwargs = dict(device_kwargs)
    if model.swiglu_fusion != "auto":  # else the device's default (megatron_device_kwargs)
        device_kwargs["bias_activation_fusion"] = model.swiglu_fusion == "on"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        ffn_hidden_size=ffn_size(model),
        kv_channels=model.hidden_size // model.num_attention_heads,
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
        bf16=bf16,
        # Loss = sum over tokens / tokens in the global batch, whatever the DP/micro-batching.
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=True,
        **moe_transformer_kwargs(model),
        **device_kwargs,
    )
