"""Text -> megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Inputs (``--input``: files, directories or glob patterns, read in the given order, a pattern's
matches sorted):

* ``.txt``: one document per file;
* ``.jsonl`` / ``.ndjson``, also gzip- (``.gz``) or zstd-compressed (``.zst``, ``.zstd``): one
  document per line, the ``text_key`` field (``--text-key``), read as a stream;
* ``.parquet``: one document per row of the ``text_key`` column, a row group at a time;
* a Hugging Face ``datasets`` folder written by ``save_to_disk`` (its ``state.json`` lists the
  Arrow files): one document per row of the ``text_key`` column, a record batch at a time.

Memory stays bounded by the documents of one batch (``_BATCH_DOCS``) and one row group /
record batch, whatever the input size; a ``.txt`` is read whole (one document).  Each document
becomes one sequence followed by the eod token, so that the model sees document boundaries
once GPTDataset packs documents into fixed-length samples; empty documents are skipped.  A
literal ``<|endoftext|>`` inside a text is encoded as ordinary bytes (``tokenizer.py``), so
eod appears only at document ends.

The files are written by ``indexed.IndexedWriter`` (megatron's format without importing
megatron-core) under temporary names and renamed ``.bin`` first, ``.idx`` last: megatron opens
the index to find the data, so an ``.idx`` present means a complete pair.  Progress (bytes of
the inputs read, percentage, ETA, documents and tokens per second) goes to stderr through tqdm.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from plt_train.data.indexed import IndexedWriter, optimal_dtype
from plt_train.data.tokenizer import Tokenizer, train_bpe

JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet",)
_BATCH_DOCS = 256  # documents per encode_batch call
_PROGRESS_EVERY_S = 2.0
_FORMATS = (".txt, .jsonl / .ndjson (optionally .gz, .zst), .parquet, or a Hugging Face "
            "datasets folder (save_to_disk)")


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int  # including eod tokens
    skipped_empty: int
    dtype: str  # token dtype in the .bin: uint16 or int32
    seconds: float
    prefix: str


def _jsonl_kind(path: str) -> Optional[str]:
    """None (plain), "gzip" or "zstd" for a JSON-lines file; raises for anything else."""
    stem, ext = os.path.splitext(path)
    if ext in COMPRESSED and stem.endswith(JSONL_SUFFIXES):
        return COMPRESSED[ext]
    if path.endswith(JSONL_SUFFIXES):
        return None
    raise ValueError(f"unsupported input {path}: use {_FORMATS}")


def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """The input files and dataset folders: glob patterns expanded (sorted), checked to exist
    and to be a known format, before any work (clear errors, not a traceback)."""
    if not inputs:
        raise ValueError("no input files given")
    out: list[str] = []
    for given in inputs:
        if glob.has_magic(given):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no input matches the pattern {given}")
        else:
            matches = [given]
        for p in matches:
            if os.path.isdir(p):
                if not _is_hf_dataset(p):
                    raise ValueError(f"input {p} is a folder but not a Hugging Face datasets "
                                     "folder (no state.json): give its files instead")
            elif not os.path.isfile(p):
                raise FileNotFoundError(f"input file not found: {p}")
            elif not p.endswith(TEXT_SUFFIXES + PARQUET_SUFFIXES):
                _jsonl_kind(p)
            out.append(p)
    return out


def _arrow_files(folder: str) -> list[str]:
    state = json.loads(Path(folder, "state.json").read_text())
    return [os.path.join(folder, f["filename"]) for f in state.get("_data_files", [])]


def _input_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(f) for f in _arrow_files(path))
    return os.path.getsize(path)


def _decode(raw: bytes, path: str, lineno: Optional[int] = None) -> str:
    """UTF-8 text, or a ValueError naming the file and line.  ``lineno``: ``raw`` is that
    line of a .jsonl (None: ``raw`` is a whole .txt file)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno if lineno is not None else 1 + raw.count(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _lines(path: str, raw) -> io.BufferedIOBase:
    kind = _jsonl_kind(path)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst needs the zstandard package "
                             "(pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _jsonl_texts(path: str, key: str, advance: Callable[[int], None]) -> Iterator[str]:
    with open(path, "rb") as raw:
        done = 0
        for lineno, line_bytes in enumerate(_lines(path, raw), 1):
            if lineno % 1024 == 0:  # progress in bytes of the (compressed) file read
                advance(raw.tell() - done)
                done = raw.tell()
            line = _decode(line_bytes, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(
                    f"{path}:{lineno}: expected an object with a string field {key!r} "
                    "(choose the field with --text-key)"
                )
            yield record[key]
        advance(os.path.getsize(path) - done)


def _column_texts(values: list, path: str, first_row: int, key: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{path}: row {first_row + i} has {type(v).__name__} in column "
                             f"{key!r}, not a string")
    return values


def _pyarrow(path: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule is used through pyarrow
    except ImportError:
        raise ValueError(f"{path}: reading Parquet / Arrow needs pyarrow "
                         "(pip install pyarrow)") from None
    return pyarrow


def _parquet_texts(path: str, key: str, advance: Callable[[int], None]) -> Iterator[str]:
    pa = _pyarrow(path)
    pf = pa.parquet.ParquetFile(path)
    if key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {key!r} (columns: {', '.join(pf.schema_arrow.names)}; "
                         "choose one with --text-key)")
    size, groups, row = os.path.getsize(path), pf.num_row_groups, 0
    for i in range(groups):
        values = pf.read_row_group(i, columns=[key]).column(key).to_pylist()
        yield from _column_texts(values, path, row, key)
        row += len(values)
        advance(size * (i + 1) // groups - size * i // groups)


def _arrow_folder_texts(folder: str, key: str, advance: Callable[[int], None]) -> Iterator[str]:
    pa = _pyarrow(folder)
    row = 0
    for path in _arrow_files(folder):
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_stream(source)
            if key not in reader.schema.names:
                raise ValueError(f"{folder}: no column {key!r} (columns: "
                                 f"{', '.join(reader.schema.names)}; choose one with --text-key)")
            done = 0
            for batch in reader:
                values = batch.column(key).to_pylist()
                yield from _column_texts(values, path, row, key)
                row += len(values)
                advance(source.tell() - done)
                done = source.tell()
            advance(os.path.getsize(path) - done)


def iter_texts(inputs: Sequence[str], text_key: str = "text",
               advance: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """Yield document texts from the inputs (``expand_inputs``), in order; ``advance(n)`` is
    told how many more bytes of the inputs have been read."""
    return _texts(expand_inputs(inputs), text_key, advance)


def _texts(paths: Sequence[str], text_key: str, advance: Callable[[int], None]) -> Iterator[str]:
    """``iter_texts`` over inputs already expanded and checked."""
    for p in paths:
        if os.path.isdir(p):
            yield from _arrow_folder_texts(p, text_key, advance)
        elif p.endswith(TEXT_SUFFIXES):
            yield _decode(Path(p).read_bytes(), p)
            advance(os.path.getsize(p))
        elif p.endswith(PARQUET_SUFFIXES):
            yield from _parquet_texts(p, text_key, advance)
        else:
            yield from _jsonl_texts(p, text_key, advance)


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess(
    inputs: Sequence[str],
    tokenizer: Tokenizer,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = True,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (see module docstring);
    ``json_key``: the field (JSON lines) or column (Parquet, Arrow) holding the text."""
    from tqdm import tqdm

    paths = expand_inputs(inputs)
    dtype = optimal_dtype(tokenizer.vocab_size)
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = f"{prefix}.bin{tag}", f"{prefix}.idx{tag}"
    t0 = time.perf_counter()
    docs = tokens = empty = 0
    writer = IndexedWriter(tmp_bin, dtype)
    bar = tqdm(total=sum(_input_bytes(p) for p in paths), unit="B", unit_scale=True,
               unit_divisor=1024, desc="preprocess", file=sys.stderr,
               mininterval=_PROGRESS_EVERY_S, dynamic_ncols=True)
    try:
        for batch in _batched(_texts(paths, json_key, bar.update), _BATCH_DOCS):
            texts = [t for t in batch if t]
            empty += len(batch) - len(texts)
            for ids in tokenizer.tokenize_batch(texts):
                if append_eod:
                    ids.append(tokenizer.eod)
                writer.add_document(ids)
                docs += 1
                tokens += len(ids)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs} docs ({docs / elapsed:.0f} docs/s), {tokens / 1e6:.2f}M "
                                f"tokens ({tokens / elapsed / 1e6:.2f}M tok/s)", refresh=False)
        if docs == 0:
            raise ValueError(f"no non-empty documents in {', '.join(inputs)}")
        writer.finalize(tmp_idx)
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        bar.close()
        writer.close()  # no-op after finalize; frees the handle on errors
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.unlink(p)
    return PreprocessStats(
        documents=docs,
        tokens=tokens,
        skipped_empty=empty,
        dtype=dtype.name,
        seconds=time.perf_counter() - t0,
        prefix=prefix,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plt-preprocess",
        description="Tokenize text files into a megatron-core indexed dataset "
        "(<prefix>.bin + <prefix>.idx) for data.prefix=<prefix>.",
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="files, folders or glob patterns: " + _FORMATS)
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="an existing HuggingFace tokenizer.json")
    tok.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a byte-level BPE on the inputs; saved as <prefix>.tokenizer.json",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="with --train-tokenizer (8192)")
    p.add_argument("--text-key", "--json-key", dest="json_key", default="text",
                   help="the field (JSON lines) or column (Parquet, Arrow) holding the text")
    p.add_argument("--no-eod", action="store_true", help="do not append eod after documents")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``plt-preprocess`` CLI. User errors exit non-zero with one line, no traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.vocab_size is not None and not args.train_tokenizer:
        parser.error("--vocab-size only applies with --train-tokenizer")
    outputs = [f"{args.output_prefix}{suffix}" for suffix in
               (".bin", ".idx", ".tokenizer.json" if args.train_tokenizer else ".bin")]
    existed = {o for o in outputs if os.path.exists(o)}
    try:
        expand_inputs(args.input)
        if args.train_tokenizer:
            tok_path = f"{args.output_prefix}.tokenizer.json"
            t0 = time.perf_counter()
            tokenizer = train_bpe(
                iter_texts(args.input, args.json_key), args.vocab_size or 8192, tok_path
            )
            print(
                f"plt-preprocess: trained BPE vocab {tokenizer.vocab_size} in "
                f"{time.perf_counter() - t0:.1f} s -> {tok_path}",
                file=sys.stderr,
            )
        else:
            tokenizer = Tokenizer.load(args.tokenizer)
        stats = preprocess(
            args.input, tokenizer, args.output_prefix, args.json_key, append_eod=not args.no_eod
        )
    except (OSError, ValueError) as e:
        for o in set(outputs) - existed:  # a failed run leaves nothing half-made behind
            if os.path.exists(o):
                os.remove(o)
        raise SystemExit(f"plt-preprocess: error: {e}") from None
    print(
        f"plt-preprocess: {stats.documents} documents, {stats.tokens} tokens ({stats.dtype}) in "
        f"{stats.seconds:.1f} s -> {stats.prefix}.bin/.idx",
        file=sys.stderr,
    )
    return 0
