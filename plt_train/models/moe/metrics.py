"""Per-step metrics of a model's MoE layers: the all-to-all traffic and megatron's aux losses.

``MoEStepMetrics`` is a step-metrics source (``models.family.StepMetrics``): the training step
calls ``reset()`` before it and ``collect()`` after it, on every rank.  It holds the model's
own MoE layers, so nothing is process-wide except megatron-core's aux-loss tracker, which
megatron's router writes into.
"""
from __future__ import annotations

import torch

from plt_train.models.moe.accounting import a2a_step_metrics
from plt_train.models.moe.layer import FineGrainedMoE


def moe_layers(modules) -> list:
    """The MoE layers (both kinds) inside ``modules``, in module order."""
    return [m for module in modules for m in module.modules() if isinstance(m, FineGrainedMoE)]


class MoEStepMetrics:
    """``a2a_MB``, ``a2a_ms``, ``a2a_ms_max`` (``accounting.a2a_step_metrics``) and
    ``load_balancing_loss`` / ``z_loss`` (``aux_loss_step_metrics``) of one training step."""

    def __init__(self, layers: list):
        self.layers = layers

    def reset(self) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        for layer in self.layers:
            layer.a2a.reset()
            layer.router.calls = 0

    def collect(self) -> dict:
        """A collective: every rank calls it (every rank built the same model)."""
        out = a2a_step_metrics([layer.a2a for layer in self.layers])
        out.update(self.aux_loss_step_metrics())
        return out

    def aux_loss_step_metrics(self) -> dict:
        """megatron-core's aux-loss tracker after a training step, reduced over ranks with
        megatron's own ``reduce_aux_losses_tracker_across_ranks`` (PP sum, TP/CP sum, DP
        mean), then divided by the router calls of the step: the mean per layer and
        micro-batch (and per loop of a looped model), before the coefficient, as Megatron-LM
        logs ``load_balancing_loss``."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        tracker = get_moe_layer_wise_logging_tracker()
        if not tracker:
            return {}
        values = next(iter(tracker.values()))["values"]
        calls = torch.zeros(values.numel(), dtype=torch.float32, device=values.device)
        for layer in self.layers:
            calls[layer.router.layer_number - 1] = layer.router.calls
        dist.all_reduce(calls, group=ps.get_pipeline_model_parallel_group())
        reduce_aux_losses_tracker_across_ranks()
        total = calls.sum().clamp(min=1)
        out = {name: (entry["values"].float().sum() / total).item()
               for name, entry in sorted(tracker.items())}
        clear_aux_losses_tracker()
        return out
