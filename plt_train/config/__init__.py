"""Typed configuration (the source of truth), the checks that need no model, and the Hydra
store.  A leaf: it imports nothing from the rest of plt_train, nor torch or megatron."""
from plt_train.config.errors import ConfigError
from plt_train.config.schema import (
    CheckpointConfig, DataConfig, LoggingConfig, LoopConfig, ModelConfig, MoEConfig,
    OptimConfig, ParallelConfig, RunConfig, SampleConfig, TrainConfig,
)
from plt_train.config.validate import derived_data_parallel, validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "LoopConfig",
    "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig", "RunConfig", "SampleConfig",
    "TrainConfig", "derived_data_parallel", "validate",
]
