"""``model.moe``: Hydra groups, validation errors, and the translation to megatron-core."""
from __future__ import annotations

import pytest
import torch

from plt_train.config import ConfigError
from plt_train.models import validate
from tests.helpers import compose_run


@pytest.mark.parametrize("group, layer", [("dense", "dense"), ("fine_grained", "fine_grained"),
                                          ("bigmac", "bigmac")])
def test_moe_group_selects_the_layer_with_paper_defaults(group, layer):
    cfg = compose_run(["experiment=debug", f"moe={group}"])
    moe = cfg.model.moe
    assert moe.layer == layer and cfg.model.num_layers == 4  # the debug model, MoE on top
    assert (moe.ratio, moe.num_experts, moe.top_k, moe.aux_loss_coeff, moe.capacity_factor) == \
        (0.25, 64, 8, 1e-3, 1.2)
    validate(cfg, world_size=2)


def test_default_run_is_the_bigmac_flagship_and_debug_is_dense():
    assert compose_run([]).model.moe.layer == "bigmac"
    assert compose_run(["experiment=debug"]).model.moe.layer == "dense"


def test_dotted_overrides_and_dropless():
    cfg = compose_run(["moe=bigmac", "model.moe.num_experts=8", "model.moe.top_k=4",
                       "model.moe.capacity_factor=null"])
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.capacity_factor is None
    validate(cfg, world_size=2)
    cfg = compose_run(["moe=fine_grained", "model.moe.wire_format=fp8"])
    validate(cfg, world_size=2)


@pytest.mark.parametrize("override, allowed", [
    ("model.moe.activation=gelu", "swiglu, relu"),
    ("model.moe.expert_gemm=cutlass", "auto, grouped, loop, te"),
    ("model.moe.wire_format=fp4", "native, bf16, fp8"),
    ("model.moe.router_score_function=tanh", "softmax, sigmoid"),
    ("model.moe.dcca_kernel=cuda", "auto, triton, torch"),
])
def test_unknown_moe_choices_fail_at_composition(override, allowed):
    with pytest.raises(Exception) as err:
        compose_run(["moe=bigmac", override])
    text = f"{err.value} {err.value.__cause__}"
    assert override.split("=")[0] in text and f"[{allowed}]" in text, text


@pytest.mark.parametrize("overrides, world, field, words", [
    (["moe=bigmac", "model.moe.num_experts=6", "parallel.expert=4",
      "train.global_batch_size=32"], 4, "model.moe.num_experts",
     "not divisible by parallel.expert=4"),
    (["parallel.expert=2"], 2, "parallel.expert", "needs MoE layers"),
    (["moe=fine_grained", "model.moe.top_k=65"], 2, "model.moe.top_k", "not in [1"),
    (["moe=bigmac", "model.moe.ratio=0.3"], 2, "model.moe.ratio", "whole number"),
    (["moe=bigmac", "model.moe.ratio=0"], 2, "model.moe.ratio", "whole number"),
    (["moe=bigmac", "model.moe.expert_gemm=te"], 2, "model.moe.expert_gemm", "not installed"),
    (["moe=bigmac", "model.moe.capacity_factor=0"], 2, "model.moe.capacity_factor", "> 0"),
    (["moe=bigmac", "parallel.tensor=2"], 2, "parallel.sequence_parallel", "sequence parallel"),
    (["moe=bigmac", "model.moe.expert_bias=true"], 2, "model.moe.expert_bias", "sigmoid"),
    (["moe=bigmac", "model.moe.expert_bias=true", "model.moe.router_score_function=sigmoid",
      "model.moe.bias_update_rate=0"], 2, "model.moe.bias_update_rate", "> 0"),
])
def test_invalid_moe_configs_name_the_field(overrides, world, field, words):
    # One change to the dense GPT baseline (the default config is the EP=2 flagship).
    cfg = compose_run(["model=small", "moe=dense", "parallel=data"] + overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert err.value.field == field, str(err.value)
    assert words in str(err.value) and "Fix:" in str(err.value)


def test_transformer_config_fields():
    from plt_train.config.schema import ParallelConfig
    from plt_train.models.transformer_config import to_transformer_config

    cfg = compose_run(["experiment=debug", "moe=bigmac", "model.moe.num_experts=8",
                       "model.moe.num_shared_experts=1", "model.moe.capacity_factor=null"])
    kwargs = dict(use_cpu_initialization=True, perform_initialization=True,
                  gradient_accumulation_fusion=False)
    tc = to_transformer_config(cfg.model, ParallelConfig(expert=2), torch.float32, kwargs)
    assert tc.num_moe_experts == 8 and tc.moe_router_topk == 8
    assert tc.moe_ffn_hidden_size == 16  # r * h = 0.25 * 64
    assert tc.moe_aux_loss_coeff == 1e-3 and tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.moe_expert_capacity_factor is None
    assert tc.moe_shared_expert_intermediate_size == 16
    assert tc.expert_model_parallel_size == 2 and tc.expert_tensor_parallel_size == 1
    assert tc.moe_token_dispatcher_type == "alltoall" and tc.moe_latent_size is None
    dense = to_transformer_config(compose_run(["experiment=debug"]).model, ParallelConfig(),
                                  torch.float32, kwargs)
    assert dense.num_moe_experts is None
