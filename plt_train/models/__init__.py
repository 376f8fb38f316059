"""Decoder families.  Each is a folder with its specs, builder, checks, FLOP and parameter
counts, gathered in a ``ModelFamily`` (``family.py``); ``FAMILIES`` maps every ``model.name``
to its family, and the rest of the package goes through ``validate``, ``build_model`` and
``ModelFamily.prepare_for_training``."""
from __future__ import annotations

from typing import Callable

import torch

from plt_train.config import (
    ConfigError, ModelConfig, ParallelConfig, RunConfig, derived_data_parallel,
)
from plt_train.config import validate as validate_config
from plt_train.config.schema import Backend, ModelName, Precision
from plt_train.models.family import ModelFamily, StepMetrics, TrainingModel


def _gpt_family() -> ModelFamily:
    from plt_train.models.gpt import build_gpt, validate_gpt
    from plt_train.models.gpt.flops import decoder_layer_parameters, flops_per_sequence_from_config
    return ModelFamily(build=build_gpt, flops_per_sequence=flops_per_sequence_from_config,
                       layer_parameters=decoder_layer_parameters, validate=validate_gpt)


def _looped_family() -> ModelFamily:
    from plt_train.models.plt import build_looped
    from plt_train.models.plt.checks import validate_looped
    from plt_train.models.plt.flops import looped_flops_per_sequence, looped_layer_parameters
    from plt_train.models.plt.pipeline import loop_pipeline_chunks
    return ModelFamily(build=build_looped, flops_per_sequence=looped_flops_per_sequence,
                       layer_parameters=looped_layer_parameters, validate=validate_looped,
                       schedule_chunks=loop_pipeline_chunks)


# Built on first use: a family's modules import megatron-core.
FAMILIES: dict[ModelName, Callable[[], ModelFamily]] = {
    ModelName.gpt: _gpt_family,
    ModelName.vanilla: _looped_family,
    ModelName.looped: _looped_family,
    ModelName.plt: _looped_family,
}


def get_family(name: str) -> ModelFamily:
    return FAMILIES[ModelName(name)]()


def validate(cfg: RunConfig, world_size: int) -> None:
    """Every check of a run's config for ``world_size`` ranks, before any process group
    starts: the layout, batch and optimizer (``config.validate``), then the model family's,
    the MoE layers' and the backend's.  Raises ConfigError for the first problem."""
    from plt_train.models.common.backends import check_transformer_engine
    from plt_train.models.moe.checks import validate_moe

    validate_config(cfg, world_size)
    if cfg.train.precision == Precision.bf16 and not torch.cuda.is_available():
        raise ConfigError("train.precision", "bf16 needs CUDA (megatron-core's bf16 optimizer "
                          "wraps CUDA tensors only)", "use fp32, or auto (bf16 on CUDA, fp32 "
                          "on CPU)")
    get_family(cfg.model.name).validate(cfg, derived_data_parallel(cfg, world_size))
    if cfg.model.backend == Backend.te:
        check_transformer_engine("model.backend", "local")
    validate_moe(cfg)


def build_model(model: ModelConfig, parallel: ParallelConfig, tokenizer_vocab: int,
                dtype: torch.dtype, device_kwargs: dict, seed: int, device: torch.device):
    """Build this rank's model chunks, initialised identically for any parallel layout.

    Returns (chunks, transformer_config, padded_vocab_size).
    """
    from plt_train.models.common.backends import resolve_backend
    from plt_train.models.common.recompute_fix import fix_checkpoint_without_output
    from plt_train.models.init import init_weights
    from plt_train.models.moe.aux_loss import bind_aux_loss_scale
    from plt_train.models.transformer_config import to_transformer_config

    fix_checkpoint_without_output()
    tconfig = to_transformer_config(model, parallel, dtype, device_kwargs)
    vocab = model.padded_vocab_size(tokenizer_vocab)
    chunk = get_family(model.name).build(model, tconfig, vocab, resolve_backend(model.backend))
    chunk.to(device)
    bind_aux_loss_scale([chunk], device)
    init_weights([chunk], seed=seed, std=model.init_method_std, num_layers=model.num_layers)
    return [chunk], tconfig, vocab


__all__ = ["FAMILIES", "ModelFamily", "StepMetrics", "TrainingModel", "build_model",
           "get_family", "validate"]
