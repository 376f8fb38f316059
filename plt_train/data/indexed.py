"""megatron-core's indexed-dataset format (``<prefix>.bin`` + ``<prefix>.idx``), written
without importing megatron-core.

``plt-preprocess`` used megatron's ``IndexedDatasetBuilder``, and importing megatron-core (and
torch) cost 5 s and about 540 MB per run just for this writer.  The format is small:

* ``.bin``: every sequence's tokens back to back, in one dtype;
* ``.idx``: the 9-byte magic ``MMIDIDX\\0\\0``, version (u64, 1), dtype code (u8), number of
  sequences (u64), number of documents + 1 (u64), then the sequence lengths (int32), their
  byte offsets into ``.bin`` (int64) and the document boundaries as sequence indices (int64,
  starting at 0).

``tests/data/test_preprocess.py`` checks that the files are byte-identical to megatron's
builder's for the same documents, in both dtypes.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """megatron's ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Append one document (one sequence) at a time, whole (``add_document``) or in pieces
    (``add_tokens`` ... ``end_document``); ``finalize`` writes the index."""

    def __init__(self, bin_path: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.data: BinaryIO = open(bin_path, "wb")
        self.lengths: list[int] = []
        self._open = 0  # tokens written of a document not yet ended

    def add_tokens(self, ids) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        self.data.write(tokens.tobytes(order="C"))
        self._open += len(tokens)

    def end_document(self) -> None:
        if self._open >= 2 ** 31:
            raise ValueError(f"a document of {self._open} tokens: megatron's index stores "
                             "lengths as int32; split it (plt-preprocess --txt-documents)")
        self.lengths.append(self._open)
        self._open = 0

    def add_document(self, ids) -> None:
        self.add_tokens(ids)
        self.end_document()

    def finalize(self, idx_path: str) -> None:
        self.data.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        write_index(idx_path, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))

    def close(self) -> None:
        self.data.close()


def write_index(idx_path: str, dtype: np.dtype, lengths: np.ndarray,
                documents: np.ndarray) -> None:
    """The ``.idx`` of sequences of ``lengths`` stored back to back, documents starting at the
    sequence indices ``documents`` (first 0, last the sequence count)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    documents = np.asarray(documents, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, DTYPE_CODES[dtype], len(lengths), len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


def _read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, document starts) of an ``.idx``."""
    with open(idx_path, "rb") as f:
        magic, _, code, sequences, documents = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise ValueError(f"{idx_path}: not a megatron index (magic {magic!r})")
    dtype = next(d for d, c in DTYPE_CODES.items() if c == code)
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=HEADER.size)
    starts = np.fromfile(idx_path, dtype=np.int64, count=documents,
                         offset=HEADER.size + 12 * sequences)
    return dtype, lengths, starts


def merge(prefixes, bin_path: str, idx_path: str) -> None:
    """Concatenate the datasets ``<prefix>.bin/.idx`` (one dtype), in order, into ``bin_path``
    and ``idx_path``: megatron's ``IndexedDatasetBuilder.add_index`` over each, then
    ``finalize``."""
    import shutil

    lengths, starts, dtype = [], [np.zeros(1, dtype=np.int64)], None
    with open(bin_path, "wb") as out:
        for prefix in prefixes:
            part_dtype, part_lengths, part_starts = _read_index(f"{prefix}.idx")
            if dtype is not None and part_dtype != dtype:
                raise ValueError(f"{prefix}: {part_dtype} tokens, the others' are {dtype}")
            dtype = part_dtype
            starts.append(part_starts[1:] + sum(len(x) for x in lengths))
            lengths.append(part_lengths)
            with open(f"{prefix}.bin", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    write_index(idx_path, dtype, np.concatenate(lengths), np.concatenate(starts))
