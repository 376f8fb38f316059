"""A model family is one complete spec: every ``model.name`` has one, with its checks, FLOPs,
parameter count and ``prepare_for_training``; the training loop gets a ``TrainingModel``."""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import ModelName
from tests.helpers import compose_run


def test_every_model_name_has_a_family():
    from plt_train.models import FAMILIES, ModelFamily, get_family

    assert set(FAMILIES) == set(ModelName)
    for name in ModelName:
        family = get_family(name)
        assert isinstance(family, ModelFamily)
        assert all(callable(f) for f in (family.build, family.flops_per_sequence,
                                         family.layer_parameters, family.validate,
                                         family.schedule_chunks))


@pytest.mark.parametrize("overrides, metric_sources", [
    (["model.name=plt", "model.loops=2"], 0),
    (["moe=bigmac", "model.moe.num_experts=4", "model.moe.top_k=2"], 1),
])
def test_prepare_for_training_hands_back_a_ready_model(one_rank, overrides, metric_sources):
    """DDP-wrapped chunks whose gradient hooks are set on the megatron config, the stages
    the schedule runs, the family's FLOPs, and the model's own metric sources (the MoE
    layers' counters, none for a dense model)."""
    from plt_train.models import get_family
    from plt_train.models.moe.metrics import MoEStepMetrics

    cfg = compose_run(["experiment=debug"] + overrides)
    family = get_family(cfg.model.name)
    model = family.prepare_for_training(cfg, 100, torch.float32, one_rank)
    try:
        (chunk,) = model.chunks
        assert model.modules == [chunk.module] and model.stages == model.chunks  # PP = 1
        assert model.config.no_sync_func == chunk.no_sync
        assert callable(model.config.finalize_model_grads_func)
        assert model.vocab_size == 128  # padded
        assert model.flops == family.flops_per_sequence(cfg.model, 128)
        assert len(model.metrics) == metric_sources
        if metric_sources:
            (source,) = model.metrics
            assert isinstance(source, MoEStepMetrics)
            assert len(source.layers) == cfg.model.num_layers
            assert {id(layer) for layer in source.layers} <= {
                id(m) for m in chunk.module.modules()}
    finally:
        model.config.finalize_model_grads_func = model.config.no_sync_func = None

