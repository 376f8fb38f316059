"""Model families. Each is a folder with its specs, builder and FLOP count; the training loop
only sees ``build_model`` and ``flops_per_sequence`` through this registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from plt_train.config.megatron import padded_vocab_size, to_transformer_config
from plt_train.config.schema import ModelConfig, ParallelConfig
from plt_train.models.common.backends import resolve_backend
from plt_train.models.init import init_weights


@dataclass(frozen=True)
class ModelFamily:
    build: Callable  # (ModelConfig, TransformerConfig, vocab_size, backend) -> MegatronModule
    flops_per_sequence: Callable  # (ModelConfig, vocab_size) -> FlopCount
    # The chunks megatron's pipeline schedule runs, from this rank's (DDP-wrapped) modules:
    # the modules themselves, or several virtual chunks sharing them (looped models run one
    # loop per virtual chunk under pipeline parallelism).
    schedule_chunks: Callable = lambda chunks: chunks  # noqa: E731


def _gpt_family() -> ModelFamily:
    from plt_train.models.gpt import build_gpt
    from plt_train.models.gpt.flops import flops_per_sequence_from_config
    return ModelFamily(build=build_gpt, flops_per_sequence=flops_per_sequence_from_config)


def _looped_family(kind: str) -> Callable[[], ModelFamily]:
    def family() -> ModelFamily:
        from functools import partial

        from plt_train.models.plt import build_looped
        from plt_train.models.plt.flops import looped_flops_per_sequence
        from plt_train.models.plt.pipeline import loop_pipeline_chunks
        return ModelFamily(build=build_looped(kind),
                           flops_per_sequence=partial(looped_flops_per_sequence, kind=kind),
                           schedule_chunks=loop_pipeline_chunks)
    return family


MODEL_REGISTRY: dict[str, Callable[[], ModelFamily]] = {
    "gpt": _gpt_family,
    "vanilla": _looped_family("vanilla"),
    "looped": _looped_family("looped"),
    "plt": _looped_family("plt"),
}


def get_family(name: str) -> ModelFamily:
    return MODEL_REGISTRY[name]()


def build_model(model: ModelConfig, parallel: ParallelConfig, vocab_size: int,
                dtype: torch.dtype, device_kwargs: dict, seed: int, device: torch.device):
    """Build this rank's model chunks, initialised identically for any parallel layout.

    Returns (chunks, transformer_config, padded_vocab_size).
    """
    tconfig = to_transformer_config(model, parallel, dtype, device_kwargs)
    vocab = padded_vocab_size(vocab_size, model)
    backend = resolve_backend(model.backend)
    chunk = get_family(model.name).build(model, tconfig, vocab, backend)
    chunk.to(device)
    init_weights([chunk], seed=seed, std=model.init_method_std, num_layers=model.num_layers)
    return [chunk], tconfig, vocab


__all__ = ["MODEL_REGISTRY", "ModelFamily", "build_model", "get_family"]
