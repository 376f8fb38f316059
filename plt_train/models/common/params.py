"""Where our own modules create their parameters, by megatron-core's rule.

megatron's linears and embeddings allocate on the current CUDA device unless
``config.use_cpu_initialization`` is set (``runtime.device.megatron_device_kwargs`` sets it on
CPU only).  Our norms, gates, experts and projections follow the same rule, so a layer built from
a spec (``build_module``) is whole on one device without a later ``.to()``: before, they were
made on the CPU and only ``build_model``'s final ``.to(device)`` brought them over, so a layer
built on its own on a GPU (the layer tests, ``bench_kernels``) mixed devices.
"""
from __future__ import annotations

import torch


def param_device(config) -> torch.device:
    if getattr(config, "use_cpu_initialization", True) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
