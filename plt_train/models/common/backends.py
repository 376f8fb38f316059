"""Backend choice for layer specs: ``local`` (megatron-core + pure torch) or ``te``, and the
checks that what a config asks for is installed here.

A spec provider, as in megatron-core's ``BackendSpecProvider``: model code asks for a layer
spec and never branches on the backend itself.
"""
from __future__ import annotations

import torch

from plt_train.config import ConfigError
from plt_train.config.schema import Backend, KernelChoice
from plt_train.runtime.device import have_transformer_engine


def resolve_backend(backend: str) -> str:
    if backend == Backend.auto:
        return "te" if torch.cuda.is_available() and have_transformer_engine() else "local"
    if backend == Backend.te and not have_transformer_engine():
        raise RuntimeError("model.backend=te but Transformer Engine is not installed "
                           "(pip install -e .[gpu] on a CUDA machine), use model.backend=local")
    return str(backend)


def check_transformer_engine(key: str, fallback: str) -> None:
    """ConfigError on ``key`` when it asks for Transformer Engine and TE is not installed."""
    if not have_transformer_engine():
        raise ConfigError(key, "te requested but Transformer Engine is not installed",
                          f"install the [gpu] extra or use {key}={fallback}")


def check_kernel_choice(key: str, choice: KernelChoice) -> None:
    """``triton`` must be usable on the device this run will get (``auto`` and ``torch``
    always are)."""
    from plt_train.kernels import triton_unusable_reason

    if choice == KernelChoice.triton:
        why = triton_unusable_reason("cuda" if torch.cuda.is_available() else "cpu")
        if why:
            raise ConfigError(key, f"triton requested but {why}", f"use {key}=auto")
