"""From a ``DataConfig`` to micro-batches: check, prepare, build datasets, iterate.

The road is ``check_data`` (cheap, before any process group, so a bad path fails in a second
with a readable message instead of a megatron assertion deep in rank 0's traceback) ->
``prepare_data`` (the embedded corpus is built once under a file lock, shared by all local
ranks) -> ``build_datasets`` (megatron-core GPTDataset: document shuffling, packing into
``seq_length + 1`` token windows, index caches) -> ``build_data_iterator`` (Megatron-LM's
sequential pretraining sampler, which makes data order a pure function of consumed samples).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from plt_train.config.schema import DataConfig
from plt_train.config import ConfigError
from plt_train.config.validate import split_weights
from plt_train.data.corpus import ensure_corpus, read_jsonl_texts
from plt_train.data.indexed import DTYPE_CODES, HEADER, MAGIC
from plt_train.data.preprocess import preprocess
from plt_train.data.tokenizer import Tokenizer, train_bpe
from plt_train.runtime.console import say

_EMBEDDED_FORMAT = 1  # bump when corpus rules or the build change, to invalidate old caches
_SPLIT_NAMES = ("train", "valid", "test")


class DataError(Exception):
    """A data problem the user can fix; the message says what, where, and how."""


@dataclass(frozen=True)
class PreparedData:
    prefix: str  # megatron indexed-dataset prefix (<prefix>.bin / <prefix>.idx); a mixture's first
    tokenizer: Tokenizer
    mixture: tuple = ()  # ((prefix, normalised weight), ...) of data.mixture; () for one dataset
    valid_mixture: tuple = ()  # the same for data.valid_mixture; (): a split of the training data

    def train_blend(self) -> tuple[list[str], Optional[list[float]]]:
        """megatron's ``blend`` of the training data."""
        if not self.mixture:
            return [self.prefix], None
        return [p for p, _ in self.mixture], [w for _, w in self.mixture]

    def valid_blend(self) -> Optional[tuple[list[str], list[float]]]:
        if not self.valid_mixture:
            return None
        return [p for p, _ in self.valid_mixture], [w for _, w in self.valid_mixture]


@dataclass(frozen=True)
class IndexInfo:
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32, one per sequence (= document for our data)
    documents: int
    tokens: int


# --------------------------------------------------------------------------- validation


def _fix_hint(prefix: str) -> str:
    return (
        f"Recreate it with `plt-preprocess --input <files> --output-prefix {prefix} "
        "--train-tokenizer`, or set data.prefix=null to use the embedded corpus."
    )


def read_index(prefix: str, key: str = "data.prefix") -> IndexInfo:
    """Parse and cross-check ``<prefix>.idx`` against ``<prefix>.bin`` without megatron.

    Megatron only asserts on the magic bytes and then memory-maps whatever sizes the header
    claims, so a truncated file surfaces later as a numpy or index error. Here every size is
    checked against the file lengths first.
    """
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{key}={prefix}: missing {' and '.join(missing)} (an indexed dataset is the "
            f"pair .bin + .idx). {_fix_hint(prefix)}"
        )
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    bad = f"{idx_path} is not a valid megatron index"
    if idx_size < HEADER.size:
        raise DataError(f"{bad}: {idx_size} bytes, shorter than the header. {_fix_hint(prefix)}")
    with open(idx_path, "rb") as f:
        magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC or version != 1:
        raise DataError(f"{bad}: wrong magic bytes or version. {_fix_hint(prefix)}")
    dtype = next((d for d, c in DTYPE_CODES.items() if c == code), None)
    if dtype is None:
        raise DataError(f"{bad}: unknown token dtype code {code}. {_fix_hint(prefix)}")
    expected = HEADER.size + 12 * n_seq + 8 * n_doc  # int32 lengths, int64 pointers, int64 docs
    if idx_size not in (expected, expected + n_seq):  # + n_seq: optional int8 sequence modes
        raise DataError(
            f"{bad}: its header describes {n_seq} sequences / {n_doc - 1} documents "
            f"({expected} bytes) but the file has {idx_size} bytes (truncated or corrupt). "
            f"{_fix_hint(prefix)}"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=n_seq, offset=HEADER.size)
    pointers = np.fromfile(idx_path, dtype=np.int64, count=n_seq, offset=HEADER.size + 4 * n_seq)
    docs = np.fromfile(idx_path, dtype=np.int64, count=n_doc, offset=HEADER.size + 12 * n_seq)
    starts = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64))) * dtype.itemsize
    if (
        n_doc < 1
        or (lengths < 0).any()
        or docs[0] != 0
        or docs[-1] != n_seq
        or (np.diff(docs) < 0).any()
        or (n_seq and not np.array_equal(pointers, starts))
    ):
        raise DataError(f"{bad}: inconsistent tables. {_fix_hint(prefix)}")
    tokens = int(lengths.sum(dtype=np.int64))
    if n_doc == 1 or tokens == 0:
        raise DataError(f"{key}={prefix}: the dataset has no tokens. {_fix_hint(prefix)}")
    if bin_size != tokens * dtype.itemsize:
        what = "truncated" if bin_size < tokens * dtype.itemsize else "longer than its index"
        raise DataError(
            f"{bin_path} is {what}: {bin_size} bytes, but {idx_path} describes {tokens} "
            f"{dtype.name} tokens ({tokens * dtype.itemsize} bytes). The pair does not belong "
            f"together or a copy was interrupted. {_fix_hint(prefix)}"
        )
    return IndexInfo(dtype=dtype, sequence_lengths=lengths, documents=n_doc - 1, tokens=tokens)


def data_sources(cfg: DataConfig) -> list[tuple[str, str]]:
    """(config key, expanded prefix) of every dataset ``cfg`` names: ``prefix`` or the
    members of ``mixture``, then those of ``valid_mixture``.  Empty: the embedded corpus."""
    out = [("data.prefix", os.path.expanduser(cfg.prefix))] if cfg.prefix else []
    for name in ("mixture", "valid_mixture"):
        out += [(f"data.{name}[{i}]", os.path.expanduser(m.prefix))
                for i, m in enumerate(getattr(cfg, name))]
    return out


def _tokenizer_path(cfg: DataConfig) -> Optional[str]:
    """``data.tokenizer``, else the one beside the (first) training dataset."""
    if cfg.tokenizer:
        return os.path.expanduser(cfg.tokenizer)
    sources = data_sources(cfg)
    return f"{sources[0][1]}.tokenizer.json" if sources else None


def _load_tokenizer(path: str, cfg: DataConfig) -> Tokenizer:
    if not os.path.isfile(path):
        sources = data_sources(cfg)
        given = (f"data.tokenizer={cfg.tokenizer}" if cfg.tokenizer
                 else f"{sources[0][0]}={sources[0][1]}" if sources else "data.tokenizer")
        raise DataError(
            f"{given}: tokenizer file {path} not found. Set data.tokenizer=<tokenizer.json> "
            "(a HuggingFace tokenizer.json) or place it next to the data as "
            "<prefix>.tokenizer.json (plt-preprocess --train-tokenizer writes it there)."
        )
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise DataError(f"data.tokenizer: {e}") from None


def _checked_tokenizer(cfg: DataConfig) -> Optional[Tokenizer]:
    """The checks of ``check_data``; returns the configured tokenizer (None: to be trained)."""
    path = _tokenizer_path(cfg)
    sources = data_sources(cfg)
    if not sources:
        return None if path is None else _load_tokenizer(path, cfg)
    tok = _load_tokenizer(path, cfg)  # type: ignore[arg-type]  # sources set => path set
    first_dtype = None
    for key, prefix in sources:
        info = read_index(prefix, key)
        if tok.vocab_size > np.iinfo(info.dtype).max + 1:
            raise DataError(
                f"{key}={prefix} stores {info.dtype.name} tokens but tokenizer {path} has "
                f"{tok.vocab_size} ids: the data was not made with this tokenizer."
            )
        top = max_token_id(prefix, info.dtype, cache_root(cfg))
        if top >= tok.vocab_size:
            raise DataError(
                f"{key}={prefix} holds token id {top}, beyond tokenizer {path}'s "
                f"{tok.vocab_size} ids: the data was not made with this tokenizer."
            )
        own = f"{prefix}.tokenizer.json"
        if os.path.isfile(own) and os.path.abspath(own) != os.path.abspath(path) \
                and Tokenizer.load(own).sha256 != tok.sha256:
            raise DataError(
                f"{key}={prefix} was made with another tokenizer ({own}) than {path}: the "
                "datasets of a run must share one tokenizer (re-run plt-preprocess with "
                "--tokenizer <the run's tokenizer.json>)."
            )
        if first_dtype is not None and info.dtype != first_dtype:
            raise DataError(
                f"{key}={prefix} stores {info.dtype.name} tokens, {sources[0][0]} "
                f"{first_dtype.name}: the datasets of a run must be made alike (same tokenizer "
                "and plt-preprocess settings)."
            )
        if first_dtype is None:
            first_dtype = info.dtype
    return tok


def max_token_id(prefix: str, dtype: np.dtype, cache: Path) -> int:
    """The largest token id in ``<prefix>.bin``: one pass over the memory-mapped file in
    chunks, then remembered in ``cache`` (keyed by path, size and modification time), so a
    multi-GB dataset is scanned once, not at every launch."""
    bin_path = Path(f"{prefix}.bin").resolve()
    stat = bin_path.stat()
    key = hashlib.sha1(f"{bin_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache / "max_token_id" / f"{key}.json"
    try:
        return int(json.loads(memo.read_text())["max"])
    except (OSError, ValueError, KeyError):
        pass
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    top, chunk = -1, 1 << 26
    for start in range(0, len(tokens), chunk):
        top = max(top, int(tokens[start:start + chunk].max()))
    del tokens
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"bin": str(bin_path), "max": top}))
    except OSError:
        pass  # a read-only cache: scan again next time
    return top


def check_data(cfg: DataConfig, model_vocab_size: Optional[int] = None) -> None:
    """Validate ``cfg`` cheaply (file reads, and one cached scan of the token ids); raise
    DataError (or ConfigError for ``model.vocab_size``) with a fix on problems.

    ``prefix=None`` with no ``mixture`` selects the embedded corpus, which is built on demand
    and always passes (a given ``tokenizer`` must still exist and load).  Every dataset named
    (``prefix`` or each mixture member) must be whole and made with the run's tokenizer.
    """
    tok = _checked_tokenizer(cfg)
    if tok is not None and model_vocab_size is not None and model_vocab_size < tok.vocab_size:
        raise ConfigError("model.vocab_size", f"{model_vocab_size} is smaller than the "
                          f"tokenizer's {tok.vocab_size} ids", "raise it, or null for the "
                          "tokenizer's vocabulary")


# --------------------------------------------------------------------------- preparation


def cache_root(cfg: DataConfig) -> Path:
    """``$PLT_TRAIN_CACHE`` if set, else ``cfg.cache_dir``, with ``~`` expanded."""
    return Path(os.path.expanduser(os.environ.get("PLT_TRAIN_CACHE") or cfg.cache_dir))


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    say(f"[plt_train.data] {msg}", sys.stderr)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """``flock`` on ``path``: one holder across processes; released if the holder dies."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _rank() == 0:
                _say(f"waiting for another process building {path.parent}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_dir(cfg: DataConfig) -> Path:
    """Cache folder of the embedded corpus: keyed by Python version and tokenizer choice."""
    if cfg.tokenizer:
        sha = hashlib.sha256(Path(os.path.expanduser(cfg.tokenizer)).read_bytes()).hexdigest()
        tok_key = f"tok{sha[:16]}"
    else:
        tok_key = f"bpe{cfg.vocab_size}"
    return cache_root(cfg) / f"embedded-py{platform.python_version()}-{tok_key}-v{_EMBEDDED_FORMAT}"


def _build_embedded(root: Path, cfg: DataConfig) -> None:
    """Corpus JSONL -> tokenizer -> .bin/.idx, then the ``done.json`` marker (written last)."""
    _say(f"building the embedded corpus once in {root}")
    t = time.perf_counter()
    corpus = ensure_corpus(root)
    n_docs = sum(1 for _ in read_jsonl_texts(corpus))
    _say(f"corpus: {n_docs} stdlib files, {corpus.stat().st_size / 1e6:.1f} MB JSONL "
         f"({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    tok_path = root / "corpus.tokenizer.json"
    if cfg.tokenizer:
        tok = _load_tokenizer(os.path.expanduser(cfg.tokenizer), cfg)
        _say(f"tokenizer: using {cfg.tokenizer} (vocab {tok.vocab_size})")
    else:
        tok = train_bpe(read_jsonl_texts(corpus), cfg.vocab_size, tok_path)
        _say(f"tokenizer: byte-level BPE, vocab {tok.vocab_size} ({time.perf_counter() - t:.1f} s)")
    stats = preprocess([str(corpus)], tok, str(root / "corpus"))
    _say(f"tokens: {stats.tokens} ({stats.dtype}) in {stats.documents} documents "
         f"({stats.seconds:.1f} s)")
    marker = {"documents": stats.documents, "tokens": stats.tokens, "tokenizer": tok.sha256,
              "python": platform.python_version(), "format": _EMBEDDED_FORMAT}
    tmp = root / "done.json.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, root / "done.json")


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Return the dataset prefix and tokenizer for ``cfg``, building the embedded corpus once.

    Safe to call from every rank at once, with or without torch.distributed: the first to take
    the lock builds, the others block on it and then load. Uses only the file system, so it
    needs no process group (nodes that do not share ``cache_dir`` each build their own copy).
    """
    tok = _checked_tokenizer(cfg)
    if cfg.prefix is not None or cfg.mixture:
        assert tok is not None  # a dataset always resolves a tokenizer (or raised)
        mixture, valid = (_normalised(members) for members in (cfg.mixture, cfg.valid_mixture))
        prefix = os.path.expanduser(cfg.prefix) if cfg.prefix else mixture[0][0]
        return PreparedData(prefix=prefix, tokenizer=tok, mixture=mixture, valid_mixture=valid)
    root = embedded_dir(cfg)
    if not (root / "done.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root / ".lock"):
            if not (root / "done.json").exists():  # re-check: another process may have built
                _build_embedded(root, cfg)
    prefix = str(root / "corpus")
    try:
        read_index(prefix)
    except DataError as e:
        raise DataError(f"the embedded-corpus cache is damaged ({e}); delete {root}") from None
    return PreparedData(
        prefix=prefix, tokenizer=tok or _load_tokenizer(f"{prefix}.tokenizer.json", cfg)
    )


def _normalised(members) -> tuple:
    """((prefix, weight / total), ...): Megatron-LM normalises a blend's weights too."""
    total = sum(m.weight for m in members)
    return tuple((os.path.expanduser(m.prefix), m.weight / total) for m in members)


# --------------------------------------------------------------------------- datasets


def _check_split(prefix: str, split: str) -> None:
    """Refuse a split that leaves a present split with no tokens.

    Megatron would loop forever there (``GPTDataset._get_num_epochs`` adds 0 tokens per epoch
    until it reaches the requested count), so this is a hang turned into an error.
    """
    try:
        weights = split_weights(split)
    except ConfigError:
        raise DataError(f"data.split={split!r}: expected up to 3 non-negative weights like "
                        "98,2,0") from None
    matrix = convert_split_vector_to_split_matrix([w / sum(weights) for w in weights])
    lengths = read_index(prefix).sequence_lengths
    n = len(lengths)
    for name, bounds in zip(_SPLIT_NAMES, matrix):
        if bounds is None:
            continue
        beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
        if lengths[beg:end].sum() == 0:
            raise DataError(
                f"data.split={split!r} gives the {name} split {end - beg} of the {n} documents "
                f"of {prefix}, with no tokens. Use more documents or a split with a larger "
                f"{name} weight (or 0 to drop it)."
            )


def build_datasets(
    prepared: PreparedData,
    seq_length: int,
    split: str,
    seed: int,
    num_samples: tuple[int, int],
    path_to_cache: str,
) -> tuple[GPTDataset, Optional[GPTDataset]]:
    """Train and valid datasets through megatron-core's BlendedMegatronDatasetBuilder: a
    GPTDataset for one dataset, a BlendedDataset over the members of a mixture.

    ``num_samples`` = (train, valid) samples to provide; megatron repeats (re-shuffled) epochs
    to reach them. Must be called on every rank: with a process group, rank 0 builds the index
    cache in ``path_to_cache`` and the others load it after a barrier. ``valid`` is None when
    the split gives it weight 0.  With ``prepared.valid_mixture`` the training data is used
    whole and validation reads the valid mixture (megatron's ``blend_per_split``).
    """
    per_split = prepared.valid_blend()
    if per_split is None:
        for prefix in prepared.train_blend()[0]:
            _check_split(prefix, split)
        sources = dict(blend=prepared.train_blend(), split=split)
    else:
        sources = dict(blend_per_split=[prepared.train_blend(), per_split, None])
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=os.path.expanduser(path_to_cache),
        tokenizer=prepared.tokenizer,  # type: ignore[arg-type]  # duck-typed, see tokenizer.py
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        **sources,
    )
    # No test set is read; megatron wants a size (0) rather than None for a weighted blend.
    test_size = None if prepared.train_blend()[1] is None and per_split is None else 0
    train, valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], test_size], lambda: True, config
    ).build()
    if train is None:
        raise DataError(f"data.split={split!r} gives the train split weight 0")
    return train, valid


def mixture_proportions(dataset: Any, samples: Optional[int] = None) -> list[tuple[str, float]]:
    """(prefix, share of the first ``samples`` samples) per member of a blended dataset (all
    of them by default); a single dataset is one member with share 1."""
    datasets = getattr(dataset, "datasets", None)
    if datasets is None:
        return [(dataset.dataset.path_prefix, 1.0)]
    index = dataset.dataset_index[:samples] if samples else dataset.dataset_index
    counts = np.bincount(index, minlength=len(datasets))
    return [(d.dataset.path_prefix, float(c) / max(len(index), 1))
            for d, c in zip(datasets, counts)]


# --------------------------------------------------------------------------- sampling


class PretrainingBatchSampler(torch.utils.data.Sampler):
    """Megatron-LM's pretraining sampler, infinite, with wrap-around.

    Global sample ``g`` is dataset index ``g % len(dataset)`` (the dataset itself is already
    shuffled by GPTDataset, so sequential order is the right one). Global batch ``k`` covers
    samples ``[start, start + mbs*dp)`` with ``start = consumed + k*mbs*dp``, and dp rank ``i``
    takes ``[start + i*mbs, start + (i+1)*mbs)``. Hence the data order depends only on
    ``consumed_samples``: resuming continues exactly, and any dp size sees the same union.
    """

    def __init__(
        self, dataset_len: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
        dp_size: int,
    ) -> None:
        if dataset_len <= 0:
            raise DataError("the dataset has no samples (sequence length longer than the data?)")
        if micro_batch_size < 1 or consumed_samples < 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"bad sampler arguments: micro_batch_size={micro_batch_size}, "
                f"consumed_samples={consumed_samples}, dp_rank={dp_rank}, dp_size={dp_size}"
            )
        self.n, self.consumed, self.mbs = dataset_len, consumed_samples, micro_batch_size
        self.rank, self.dp = dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed + self.rank * self.mbs
        while True:
            yield [(start + j) % self.n for j in range(self.mbs)]
            start += self.mbs * self.dp


def build_data_iterator(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Infinite iterator of this dp rank's micro-batches (see PretrainingBatchSampler).

    Each batch is a dict of stacked tensors: ``tokens``/``labels``/``position_ids`` int64
    [b, s] and ``loss_mask`` float32 [b, s]. A torch DataLoader with a batch sampler, so
    ``num_workers > 0`` reads samples in worker processes; the order is the same either way.
    """
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size
    )
    # A private generator: starting an iterator draws its workers' base seed, and from torch's
    # global RNG that draw would shift dropout after a resume (the RNG state is restored
    # before the iterators are built, and each evaluation builds one).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    return iter(loader)
