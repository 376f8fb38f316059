"""Data pipeline: embedded corpus, BPE tokenizer, preprocessing, megatron datasets, sampler.

Typical use (every rank)::

    check_data(cfg.data)                       # before process groups: fail fast, clearly
    prepared = prepare_data(cfg.data)          # builds the embedded corpus once (file lock)
    train_ds, valid_ds = build_datasets(prepared, seq_length, cfg.data.split, seed,
                                        (train_samples, valid_samples), path_to_cache)
    batches = build_data_iterator(train_ds, consumed_samples, micro_batch_size,
                                  dp_rank, dp_size, cfg.data.num_workers)

The names from ``datasets`` are resolved lazily (PEP 562) because that module imports
megatron-core and torch (about 5 s and a burst of warnings); the tokenizer, corpus and
preprocessing CLI stay light. Note: ``plt_train.data.preprocess`` here is the *function*;
import the module with ``from plt_train.data.preprocess import ...``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from plt_train.data.corpus import CorpusStats, iter_source_files, write_corpus
from plt_train.data.preprocess import PreprocessStats, preprocess
from plt_train.data.tokenizer import EOD_TOKEN, Tokenizer, train_bpe

_LAZY = (
    "DataError",
    "PreparedData",
    "PretrainingBatchSampler",
    "build_data_iterator",
    "build_datasets",
    "check_data",
    "mixture_proportions",
    "prepare_data",
)
__all__ = [
    "CorpusStats",
    "EOD_TOKEN",
    "PreprocessStats",
    "Tokenizer",
    "iter_source_files",
    "preprocess",
    "train_bpe",
    "write_corpus",
    *_LAZY,
]

if TYPE_CHECKING:
    from plt_train.data.datasets import (
        DataError,
        PreparedData,
        PretrainingBatchSampler,
        build_data_iterator,
        build_datasets,
        check_data,
        mixture_proportions,
        prepare_data,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.datasets"), name)
    globals()[name] = value
    return value
