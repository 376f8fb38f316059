"""Corpus statistics used as yardsticks for training curves."""
from __future__ import annotations

import numpy as np

from plt_train.data.datasets import read_index


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats/token) of the corpus' token frequencies: the loss of the best model that
    ignores context.  A language model that learned anything scores clearly below it."""
    info = read_index(prefix)
    tokens = np.fromfile(f"{prefix}.bin", dtype=info.dtype)
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())
