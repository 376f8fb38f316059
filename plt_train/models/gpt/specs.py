"""megatron-core ``ModuleSpec`` for the baseline decoder layer (pre-norm, RMSNorm, SwiGLU).

The local spec mirrors megatron-core's ``get_gpt_layer_local_spec`` with two substitutions:
``SDPAttention`` for the unfused ``DotProductAttention`` and an RMSNorm that supports sequence
parallelism.  The TE spec is megatron-core's own.
"""
from __future__ import annotations

import dataclasses

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer, TransformerLayerSubmodules,
)

from plt_train.models.common.linear import RowParallelLinear
from plt_train.models.common.norms import RMSNorm
from plt_train.models.common.sdpa_attention import SDPAttention


def local_self_attention_spec(core_attention=SDPAttention) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def local_mlp_spec() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def local_layer_spec(self_attention: ModuleSpec | None = None,
                     mlp: ModuleSpec | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=self_attention or local_self_attention_spec(),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp or local_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )
    return get_gpt_layer_with_transformer_engine_spec()


def with_mlp(layer: ModuleSpec, mlp: ModuleSpec, norm) -> ModuleSpec:
    """``layer`` with its MLP replaced by ``mlp`` (an MoE layer) behind its own pre-MLP norm:
    TE's dense layer has none (the norm is fused into the first linear), and megatron's TE
    spec for MoE puts ``TENorm`` there the same way."""
    sub = dataclasses.replace(layer.submodules, pre_mlp_layernorm=norm, mlp=mlp)
    return dataclasses.replace(layer, submodules=sub)


def decoder_block_spec(config, backend: str, mlp: ModuleSpec | None = None,
                       self_attention: ModuleSpec | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds plus the final norm.

    ``mlp`` / ``self_attention`` replace the local defaults (MoE layers, looped attention);
    on TE, ``mlp`` replaces TE's fused dense MLP.  Passing a bare layer spec to ``GPTModel``
    would make megatron-core pick its own final norm (``WrappedTorchNorm`` on the local
    backend, which refuses sequence parallelism).
    """
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        layer, norm = te_layer_spec(), TENorm
        if mlp is not None:
            layer = with_mlp(layer, mlp, TENorm)
    else:
        layer, norm = local_layer_spec(self_attention=self_attention, mlp=mlp), RMSNorm
    n = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm)
