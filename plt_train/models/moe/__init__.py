"""Mixture-of-experts MLPs: the fine-grained (CDAC) baseline and BigMac (DCCA).

Every decoder builder asks ``mlp_spec`` for its MLP, so any model (GPT, looped, PLT) gets MoE
layers from ``model.moe`` without knowing about them.
"""
from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from plt_train.config.schema import ModelConfig


def mlp_spec(model: ModelConfig) -> ModuleSpec:
    """The MLP ``ModuleSpec`` of every decoder layer for ``model.moe.layer``."""
    from plt_train.models.gpt.specs import local_mlp_spec

    if model.moe.layer == "dense":
        return local_mlp_spec()
    raise NotImplementedError(f"model.moe.layer={model.moe.layer!r} is not built yet")


__all__ = ["mlp_spec"]
