"""Inference: KV caches (full and rolling-window) and the generator with PLT's one-pass
decode step."""
from plt_train.inference.cache import KVCache
from plt_train.inference.generator import (
    Generation, Generator, as_decoder, decoding_config, sample, sample_after_training,
)

__all__ = ["Generation", "Generator", "KVCache", "as_decoder", "decoding_config", "sample",
           "sample_after_training"]
