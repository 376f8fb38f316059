"""The ``model.moe`` checks of a run's config: every decoder family takes MoE layers, so
``plt_train.models.validate`` runs these for all of them."""
from __future__ import annotations

from plt_train.config import ConfigError, RunConfig
from plt_train.config.schema import ExpertGemm, MLPLayer
from plt_train.models.common.backends import check_kernel_choice, check_transformer_engine


def validate_moe(cfg: RunConfig) -> None:
    m, p, moe = cfg.model, cfg.parallel, cfg.model.moe
    if moe.layer == MLPLayer.dense:
        if p.expert > 1:
            raise ConfigError("parallel.expert", f"expert parallelism ({p.expert}) needs MoE "
                              "layers, the model is dense",
                              "set model.moe.layer=fine_grained or bigmac, or parallel.expert=1")
        return
    if moe.num_experts < 1:
        raise ConfigError("model.moe.num_experts", f"must be >= 1, got {moe.num_experts}",
                          "the paper uses 64")
    if moe.num_experts % p.expert:
        raise ConfigError("model.moe.num_experts", f"{moe.num_experts} experts are not "
                          f"divisible by parallel.expert={p.expert} (each expert-parallel rank "
                          "holds the same number of experts)",
                          f"use a multiple of {p.expert} experts or an expert-parallel size "
                          f"that divides {moe.num_experts}")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError("model.moe.top_k", f"{moe.top_k} is not in [1, num_experts="
                          f"{moe.num_experts}]", "route each token to 1..num_experts experts")
    width = moe.ratio * m.hidden_size
    if moe.ratio <= 0 or abs(width - round(width)) > 1e-6 or round(width) < 1:
        raise ConfigError("model.moe.ratio", f"r * hidden_size = {moe.ratio} * {m.hidden_size} "
                          f"= {width:g} is not a positive whole number",
                          "pick r so that r * hidden_size is an integer (the expert width)")
    if moe.expert_gemm == ExpertGemm.te:
        check_transformer_engine("model.moe.expert_gemm", "auto")
    check_kernel_choice("model.moe.dcca_kernel", moe.dcca_kernel)
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError("model.moe.capacity_factor", f"must be > 0, got {moe.capacity_factor}",
                          "use e.g. 1.2, or null for dropless routing")
    if moe.aux_loss_coeff < 0:
        raise ConfigError("model.moe.aux_loss_coeff", "must be >= 0", "the paper uses 1e-3")
    if moe.expert_bias and str(moe.router_score_function) != "sigmoid":
        raise ConfigError("model.moe.expert_bias", "needs router_score_function=sigmoid "
                          f"(megatron-core's expert bias), got {moe.router_score_function}",
                          "set model.moe.router_score_function=sigmoid")
    if moe.expert_bias and not moe.bias_update_rate > 0:
        raise ConfigError("model.moe.bias_update_rate", f"must be > 0, got "
                          f"{moe.bias_update_rate}", "DeepSeek-V3 uses 1e-3")
    if moe.num_shared_experts < 0:
        raise ConfigError("model.moe.num_shared_experts", "must be >= 0", "0 disables them")
    if p.tensor > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", "MoE layers with tensor parallelism "
                          "need sequence parallelism (megatron-core refuses TP without it)",
                          "set parallel.sequence_parallel=true")
