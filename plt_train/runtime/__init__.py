"""Process groups, devices, seeds and the megatron-core CPU shim; knows nothing of models."""
from plt_train.runtime.console import say
from plt_train.runtime.device import DeviceInfo, detect_device, resolve_dtype
from plt_train.runtime.distributed import (
    ParallelDims, destroy_distributed, init_distributed, is_logging_rank, set_seed,
)

__all__ = [
    "DeviceInfo", "ParallelDims", "destroy_distributed", "detect_device", "init_distributed",
    "is_logging_rank", "resolve_dtype", "say", "set_seed",
]
