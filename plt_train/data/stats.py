"""Corpus statistics used as yardsticks for training curves."""
from __future__ import annotations

import numpy as np

from plt_train.data.datasets import read_index

CHUNK = 1 << 20  # tokens per read


def unigram_entropy(prefix: str, max_tokens: int = 64 * CHUNK) -> float:
    """Entropy (nats/token) of the corpus' token frequencies: the loss of the best model that
    ignores context.  A language model that learned anything scores clearly below it.

    Exact for corpora up to ``max_tokens``; above that, estimated from ``max_tokens`` tokens
    read in evenly spaced chunks.  It runs on the logging rank while the others wait at their
    next collective, so it must stay seconds even for a corpus of billions of tokens, and
    memory-mapped chunks keep it from loading the whole ``.bin``.
    """
    tokens = np.memmap(f"{prefix}.bin", dtype=read_index(prefix).dtype, mode="r")
    n_chunks = -(-min(tokens.size, max_tokens) // CHUNK)
    starts = np.linspace(0, max(tokens.size - CHUNK, 0), n_chunks).astype(np.int64) \
        if tokens.size > max_tokens else np.arange(n_chunks, dtype=np.int64) * CHUNK
    counts = np.zeros(0, dtype=np.int64)
    for start in starts:
        c = np.bincount(np.asarray(tokens[start:start + CHUNK]))
        if c.size > counts.size:
            counts = np.pad(counts, (0, c.size - counts.size))
        counts[:c.size] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
