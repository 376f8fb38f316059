"""Typed configuration (the source of truth), its validation, and the one translation to
megatron-core's TransformerConfig. Knows nothing of torch.distributed."""
from plt_train.config.schema import (
    CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
    RunConfig, TrainConfig,
)
from plt_train.config.validate import ConfigError, derived_data_parallel, validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "derived_data_parallel",
    "validate",
]
