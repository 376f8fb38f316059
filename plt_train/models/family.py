"""What a decoder family is to the rest of the package (torchtitan's ``ModelSpec``).

A ``ModelFamily`` holds everything a variant needs: its config checks, its builder, its FLOP
count (the MFU numerator), its parameters per layer (the dry run's plan), and how megatron's
pipeline schedule runs it.  ``prepare_for_training`` turns it into a ``TrainingModel``: the
modules wrapped for data parallelism, the chunks the schedule runs, the megatron config with
its gradient hooks set, the FLOPs and the per-step metric sources, so the training loop never
looks inside a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from plt_train.config import RunConfig
from plt_train.models.gpt.flops import FlopCount


class StepMetrics(Protocol):
    """A source of per-step metrics (e.g. the MoE layers' all-to-all traffic): ``reset()``
    before a training step, ``collect()`` after it, on every rank (it may run collectives)."""

    def reset(self) -> None: ...

    def collect(self) -> dict: ...


@dataclass
class TrainingModel:
    """One rank's model, ready for ``training.step``."""

    chunks: list
    """This rank's modules, wrapped in megatron DDP (optimizer, checkpoints and gradient
    finalisation see these)."""
    stages: list
    """What megatron's schedule runs: ``chunks``, or virtual chunks sharing them (a looped
    model under pipeline parallelism runs one loop per virtual chunk)."""
    config: Any
    """The megatron ``TransformerConfig``, with ``finalize_model_grads_func`` and
    ``no_sync_func`` set for ``chunks``."""
    vocab_size: int
    """Padded embedding rows."""
    flops: FlopCount
    """Model FLOPs of one sequence."""
    metrics: list
    """``StepMetrics`` sources of the model's components."""

    @property
    def modules(self) -> list:
        """The chunks without their DDP wrapper."""
        return [getattr(c, "module", c) for c in self.chunks]


@dataclass(frozen=True)
class ModelFamily:
    build: Callable
    """(ModelConfig, TransformerConfig, padded vocab, backend) -> this rank's module."""
    flops_per_sequence: Callable[..., FlopCount]
    """(ModelConfig, padded vocab) -> FlopCount."""
    layer_parameters: Callable[..., int]
    """(ModelConfig, tp, ep) -> parameters of one layer held by one rank."""
    validate: Callable[[RunConfig, int], None]
    """(RunConfig, data-parallel size): raise ConfigError for what this family refuses."""
    schedule_chunks: Callable[[list], list] = lambda chunks: chunks  # noqa: E731
    """The chunks megatron's schedule runs, from this rank's (DDP-wrapped) modules."""

    def prepare_for_training(self, cfg: RunConfig, tokenizer_vocab: int, dtype: torch.dtype,
                             device) -> TrainingModel:
        """Build this rank's model (``device``: a ``runtime.DeviceInfo``), wrap it for data
        parallelism and set what megatron's schedule needs."""
        from megatron.core.distributed import finalize_model_grads

        from plt_train.models import build_model
        from plt_train.models.moe.metrics import MoEStepMetrics, moe_layers
        from plt_train.models.parallelize import wrap_data_parallel
        from plt_train.runtime.device import megatron_device_kwargs

        modules, tconfig, vocab = build_model(
            cfg.model, cfg.parallel, tokenizer_vocab, dtype, megatron_device_kwargs(device),
            cfg.train.seed, device.device)
        if cfg.model.compile:
            from plt_train.models.compile import compile_layers
            compile_layers(modules, cfg.model, device.device)
        chunks = wrap_data_parallel(modules, tconfig, cfg.parallel)
        # Gradients are finalised over the modules themselves, also when the schedule runs
        # several virtual chunks that share them.
        tconfig.finalize_model_grads_func = lambda _stages, *a, **kw: finalize_model_grads(
            chunks, *a, **kw)
        tconfig.no_sync_func = chunks[0].no_sync
        layers = moe_layers(modules)
        return TrainingModel(
            chunks=chunks, stages=self.schedule_chunks(chunks), config=tconfig,
            vocab_size=vocab, flops=self.flops_per_sequence(cfg.model, vocab),
            metrics=[MoEStepMetrics(layers)] if layers else [])
