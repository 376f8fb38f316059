"""Backend choice for layer specs: ``local`` (megatron-core + pure torch) or ``te``.

A spec provider, as in megatron-core's ``BackendSpecProvider``: model code asks for a layer
spec and never branches on the backend itself.
"""
from __future__ import annotations

import torch


def have_transformer_engine() -> bool:
    """TE's bare PyPI package is an empty meta package that raises RuntimeError on import
    (MCORE-ON-CPU.md), so both errors mean "not installed"."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "te" if torch.cuda.is_available() and have_transformer_engine() else "local"
    if backend == "te" and not have_transformer_engine():
        raise RuntimeError("model.backend=te but Transformer Engine is not installed "
                           "(pip install -e .[gpu] on a CUDA machine), use model.backend=local")
    return backend
