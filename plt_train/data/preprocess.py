"""Text -> megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Inputs (``--input``: files, directories or glob patterns, read in the given order, a pattern's
matches sorted):

* ``.txt``: one document per file, per paragraph (blank-line separated) or per line
  (``--txt-documents``), read as a stream (``_txt_pieces``);
* ``.jsonl`` / ``.ndjson``, also gzip- (``.gz``) or zstd-compressed (``.zst``, ``.zstd``): one
  document per line, the ``text_key`` field (``--text-key``), read as a stream;
* ``.parquet``: one document per row of the ``text_key`` column, a row group at a time;
* a Hugging Face ``datasets`` folder written by ``save_to_disk`` (its ``state.json`` lists the
  Arrow files): one document per row of the ``text_key`` column, a record batch at a time.

Memory stays bounded by one batch of documents (``_BATCH_DOCS``, ``_BATCH_CHARS``) and one row
group / record batch, whatever the input size.  A ``.txt`` document longer than ``_TXT_PIECE_BYTES`` is
read, tokenized and written in pieces, cut where a byte-level BPE pre-tokenizer (ours,
GPT-2's) splits anyway: between the two newlines of a blank line, else after a newline, else
before a space; so its ids are those of the whole text (tested).  A tokenizer that merges
across such places could differ at a cut, at most once per piece.  Each document
becomes one sequence followed by the eod token, so that the model sees document boundaries
once GPTDataset packs documents into fixed-length samples; empty documents are skipped.  A
literal ``<|endoftext|>`` inside a text is encoded as ordinary bytes (``tokenizer.py``), so
eod appears only at document ends.

``workers`` > 1 splits the input files into that many runs of about equal size, each written
by a process of its own as a shard, then concatenated in input order (``indexed.merge``): the
same bytes as one process.  The tokenizer already uses every core for one process's batches,
so this pays where reading and parsing, not encoding, is the bottleneck (on 2 cores and 75.6
MB of JSONL in 6 files: 11.1 s with 2 workers, 11.0 s with one).

The files are written by ``indexed.IndexedWriter`` (megatron's format without importing
megatron-core) under temporary names and renamed ``.bin`` first, ``.idx`` last: megatron opens
the index to find the data, so an ``.idx`` present means a complete pair.  Progress (bytes of
the inputs read, percentage, ETA, documents and tokens per second) goes to stderr through tqdm,
with a bar of its own while ``--train-tokenizer`` reads the inputs (a first pass: the BPE
trainer needs every text before the first one can be encoded).
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
_BATCH_CHARS = 4 << 20  # ... and at most about this much text per encode_batch call
_TXT_PIECE_BYTES = 1 << 20  # a .txt document is read and tokenized in pieces of about this
TXT_DOCUMENTS = ("file", "paragraphs", "lines")
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


def _decode(raw: bytes, path: str, first_line: int) -> str:
    """UTF-8 text, or a ValueError naming the file and line; ``raw`` starts on line
    ``first_line`` of ``path`` (a .jsonl line, or a piece of a .txt)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
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
               advance: Callable[[int], None] = lambda n: None,
               txt_documents: str = "file") -> Iterator[str]:
    """Yield the inputs' texts (``expand_inputs``), in order: one per document, a long .txt
    document in pieces cut at pre-token boundaries (which is all a BPE trainer needs);
    ``advance(n)`` is told how many more bytes of the inputs have been read."""
    return (text for text, _ in _pieces(expand_inputs(inputs), text_key, advance,
                                        txt_documents))


def _pieces(paths: Sequence[str], text_key: str, advance: Callable[[int], None],
            txt_documents: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) over inputs already expanded and checked: every document is
    one piece except long .txt ones."""
    for p in paths:
        if os.path.isdir(p):
            texts = _arrow_folder_texts(p, text_key, advance)
        elif p.endswith(TEXT_SUFFIXES):
            yield from _txt_pieces(p, txt_documents, advance)
            continue
        elif p.endswith(PARQUET_SUFFIXES):
            texts = _parquet_texts(p, text_key, advance)
        else:
            texts = _jsonl_texts(p, text_key, advance)
        yield from ((text, True) for text in texts)


def _cut(buf: bytes) -> int:
    """Where to end a piece of ``buf``: between the newlines of its last blank line, else after
    its last newline, else before its last space, else at its last UTF-8 character start
    (every one a boundary of a byte-level BPE pre-tokenizer, but the last)."""
    blank = buf.rfind(b"\n\n")
    if blank > 0:
        return blank + 1
    for found in (buf.rfind(b"\n") + 1, buf.rfind(b" ")):
        if found > 0:
            return found
    start = len(buf) - 1  # the last character's first byte (it may be incomplete)
    while start > 0 and buf[start] & 0xC0 == 0x80:
        start -= 1
    return start or len(buf)


def _txt_pieces(path: str, documents: str, advance: Callable[[int], None],
                piece_bytes: Optional[int] = None) -> Iterator[tuple[str, bool]]:
    """A .txt as (text, ends a document) pieces of at most about ``piece_bytes``: the file
    is one document (``file``), or each run of lines between blank lines is (``paragraphs``),
    or each line is (``lines``; its newline dropped).  Line endings are kept otherwise."""
    if documents not in TXT_DOCUMENTS:
        raise ValueError(f"txt documents must be one of {TXT_DOCUMENTS}, not {documents!r}")
    limit = piece_bytes or _TXT_PIECE_BYTES
    buf, line_no, started = b"", 1, False  # line_no: buf's first line; started: a piece of
    # the current document has been yielded

    def emit(raw: bytes, ends: bool) -> tuple[str, bool]:
        nonlocal line_no, started
        text = _decode(raw, path, line_no)
        line_no += raw.count(b"\n")
        started = not ends
        return text, ends

    with open(path, "rb") as f:
        for line in f:
            advance(len(line))
            if documents == "lines":
                text, _ = emit(line, True)
                yield text.rstrip("\r\n"), True
                continue
            if documents == "paragraphs" and not line.strip():  # a blank line ends one
                if buf or started:  # (blank lines are never in buf)
                    yield emit(buf, True)
                line_no += line.count(b"\n")
                buf = b""
                continue
            buf += line
            while len(buf) > limit:
                cut = _cut(buf[:limit])
                yield emit(buf[:cut], False)
                buf = buf[cut:]
    if documents == "file" or (documents == "paragraphs" and (buf or started)):
        yield emit(buf, True)


def _batched(pieces: Iterator[tuple[str, bool]], n: int,
             max_chars: int = _BATCH_CHARS) -> Iterator[list]:
    """Lists of at most ``n`` pieces and about ``max_chars`` characters (their ids are held
    as Python ints until written: bounded, whatever the documents' sizes)."""
    batch: list = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) == n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _progress(paths: Sequence[str], what: str):
    """A tqdm bar over the inputs' bytes on stderr (percentage, rate, ETA)."""
    from tqdm import tqdm

    return tqdm(total=sum(_input_bytes(p) for p in paths), unit="B", unit_scale=True,
                unit_divisor=1024, desc=what, file=sys.stderr, mininterval=_PROGRESS_EVERY_S,
                dynamic_ncols=True)


def preprocess(
    inputs: Sequence[str],
    tokenizer: Tokenizer,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = True,
    txt_documents: str = "file",
    workers: int = 1,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (see module docstring);
    ``json_key``: the field (JSON lines) or column (Parquet, Arrow) holding the text;
    ``txt_documents``: what a document of a .txt is (``TXT_DOCUMENTS``); ``workers``:
    processes over the input files (``_in_parallel``), the same output."""
    paths = expand_inputs(inputs)
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(paths, workers)
    if len(groups) > 1:
        return _in_parallel(groups, tokenizer, prefix, json_key, append_eod, txt_documents)
    return _write(paths, tokenizer, prefix, json_key, append_eod, txt_documents)


def _groups(paths: Sequence[str], n: int) -> list[list[str]]:
    """At most ``n`` runs of consecutive paths with about equal bytes each: a file goes to the
    group its middle byte falls in."""
    n = max(1, min(n, len(paths)))
    sizes = [_input_bytes(p) for p in paths]
    target = max(sum(sizes) / n, 1)
    groups: list[list[str]] = [[]]
    done = 0
    for path, size in zip(paths, sizes):
        if groups[-1] and min(int((done + size / 2) // target), n - 1) >= len(groups):
            groups.append([])
        groups[-1].append(path)
        done += size
    return groups


_SHARED_BYTES = None  # a worker's counter of input bytes read (_in_parallel)


def _start_worker(counter, threads: int) -> None:
    global _SHARED_BYTES
    _SHARED_BYTES = counter
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizer's pool: cores / workers


def _advance_shared(n: int) -> None:
    with _SHARED_BYTES.get_lock():
        _SHARED_BYTES.value += n


def _write_shard(paths, tokenizer, prefix, json_key, append_eod, txt_documents):
    return _write(paths, tokenizer, prefix, json_key, append_eod, txt_documents,
                  advance=_advance_shared)


def _in_parallel(groups: list[list[str]], tokenizer: Tokenizer, prefix: str, json_key: str,
                 append_eod: bool, txt_documents: str) -> PreprocessStats:
    """Each group of input files in a process of its own (spawned: the tokenizer's thread
    pool does not survive a fork), written as a shard ``<prefix>.shard<i>-<pid>``; then the
    shards are concatenated in input order (``indexed.merge``) and removed: the bytes of a
    one-process run.  One progress bar over all the inputs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    from plt_train.data.indexed import merge

    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    shards = [f"{prefix}.shard{i}-{os.getpid()}" for i in range(len(groups))]
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = f"{prefix}.bin{tag}", f"{prefix}.idx{tag}"
    made = [f"{s}.{ext}" for s in shards for ext in ("bin", "idx")] + [tmp_bin, tmp_idx]
    bar = _progress([p for g in groups for p in g], "preprocess")
    try:
        with ProcessPoolExecutor(len(groups), mp_context=ctx, initializer=_start_worker,
                                 initargs=(counter, threads)) as pool:
            futures = [pool.submit(_write_shard, group, tokenizer, shard, json_key, append_eod,
                                   txt_documents) for group, shard in zip(groups, shards)]
            while wait(futures, timeout=_PROGRESS_EVERY_S / 4).not_done:
                bar.update(counter.value - bar.n)
            bar.update(counter.value - bar.n)
            parts = [f.result() for f in futures]  # a worker's error is raised here
        if sum(s.documents for s in parts) == 0:
            raise ValueError(f"no non-empty documents in {', '.join(p for g in groups for p in g)}")
        merge(shards, tmp_bin, tmp_idx)
        os.replace(tmp_bin, f"{prefix}.bin")  # .bin first: an .idx means a complete pair
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        bar.close()
        for path in made:
            if os.path.exists(path):
                os.unlink(path)
    return PreprocessStats(
        documents=sum(s.documents for s in parts), tokens=sum(s.tokens for s in parts),
        skipped_empty=sum(s.skipped_empty for s in parts), dtype=parts[0].dtype,
        seconds=time.perf_counter() - t0, prefix=prefix)


def _write(paths: Sequence[str], tokenizer: Tokenizer, prefix: str, json_key: str,
           append_eod: bool, txt_documents: str,
           advance: Optional[Callable[[int], None]] = None) -> PreprocessStats:
    """One process's ``preprocess`` of ``paths`` (expanded); ``advance``: report the bytes
    read there instead of to a progress bar of its own (a shard: no documents is no error)."""
    dtype = optimal_dtype(tokenizer.vocab_size)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = f"{prefix}.bin{tag}", f"{prefix}.idx{tag}"
    t0 = time.perf_counter()
    docs = tokens = empty = 0
    writer = IndexedWriter(tmp_bin, dtype)
    bar = _progress(paths, "preprocess") if advance is None else None
    pending = 0  # tokens of a document whose later pieces are still to come
    try:
        pieces = _pieces(paths, json_key, advance or bar.update, txt_documents)
        for batch in _batched(pieces, _BATCH_DOCS):
            encoded = tokenizer.tokenize_batch([text for text, _ in batch])
            for ids, (_, ends) in zip(encoded, batch):
                if not ends:
                    writer.add_tokens(ids)
                    pending += len(ids)
                    continue
                if not ids and not pending:
                    empty += 1
                    continue
                if append_eod:
                    ids.append(tokenizer.eod)
                writer.add_tokens(ids)
                writer.end_document()
                docs += 1
                tokens += pending + len(ids)
                pending = 0
            elapsed = max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix_str(f"{docs} docs ({docs / elapsed:.0f} docs/s), "
                                    f"{tokens / 1e6:.2f}M tokens "
                                    f"({tokens / elapsed / 1e6:.2f}M tok/s)", refresh=False)
        if docs == 0 and advance is None:
            raise ValueError(f"no non-empty documents in {', '.join(paths)}")
        writer.finalize(tmp_idx)
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        if bar is not None:
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
    p.add_argument("--workers", type=int, default=1,
                   help="processes over the input files (runs of files of about equal size), "
                        "each writing a shard; the shards are merged in input order into the "
                        "same dataset one process writes")
    p.add_argument("--txt-documents", choices=TXT_DOCUMENTS, default="file",
                   help="a .txt document: the whole file (default), each paragraph "
                        "(separated by blank lines), or each line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``plt-preprocess`` CLI. User errors exit non-zero with one line, no traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.vocab_size is not None and not args.train_tokenizer:
        parser.error("--vocab-size only applies with --train-tokenizer")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    outputs = [f"{args.output_prefix}{suffix}" for suffix in
               (".bin", ".idx", ".tokenizer.json" if args.train_tokenizer else ".bin")]
    existed = {o for o in outputs if os.path.exists(o)}
    try:
        expand_inputs(args.input)
        if args.train_tokenizer:
            tok_path = f"{args.output_prefix}.tokenizer.json"
            t0 = time.perf_counter()
            with _progress(expand_inputs(args.input), "train tokenizer") as bar:
                tokenizer = train_bpe(
                    iter_texts(args.input, args.json_key, bar.update, args.txt_documents),
                    args.vocab_size or 8192, tok_path
                )
            print(
                f"plt-preprocess: trained BPE vocab {tokenizer.vocab_size} in "
                f"{time.perf_counter() - t0:.1f} s -> {tok_path}",
                file=sys.stderr,
            )
        else:
            tokenizer = Tokenizer.load(args.tokenizer)
        stats = preprocess(
            args.input, tokenizer, args.output_prefix, args.json_key, append_eod=not args.no_eod,
            txt_documents=args.txt_documents, workers=args.workers,
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
