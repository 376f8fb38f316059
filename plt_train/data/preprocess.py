"""Text files -> megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Input formats: ``.txt`` is one document per file; ``.jsonl`` is one document per line (the
``json_key`` field). Each document becomes one sequence, followed by the eod token so that the
model sees document boundaries once GPTDataset packs documents into fixed-length samples.

The two files are written under temporary names and renamed ``.bin`` first, ``.idx`` last:
megatron opens the index to find the data, so an ``.idx`` present means a complete pair.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from plt_train.data.tokenizer import Tokenizer, train_bpe

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt",)
_BATCH_DOCS = 256  # documents per encode_batch call
_PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int  # including eod tokens
    skipped_empty: int
    dtype: str  # token dtype in the .bin: uint16 or int32
    seconds: float
    prefix: str


def _check_inputs(inputs: Sequence[str]) -> None:
    """Fail before any work on a missing file or an unknown format (clear, not a traceback)."""
    if not inputs:
        raise ValueError("no input files given")
    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
        if not p.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise ValueError(
                f"unsupported input {p}: use .txt (one document per file) or .jsonl "
                "(one JSON object per line)"
            )


def _decode(raw: bytes, path: str, lineno: Optional[int] = None) -> str:
    """UTF-8 text, or a ValueError naming the file and line.  ``lineno``: ``raw`` is that
    line of a .jsonl (None: ``raw`` is a whole .txt file)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno if lineno is not None else 1 + raw.count(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def iter_texts(inputs: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield document texts from .txt and .jsonl files, in the given order."""
    _check_inputs(inputs)
    for p in inputs:
        if p.endswith(TEXT_SUFFIXES):
            yield _decode(Path(p).read_bytes(), p)
            continue
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, p, lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                    raise ValueError(
                        f"{p}:{lineno}: expected an object with a string field {json_key!r} "
                        "(choose the field with --json-key)"
                    )
                yield record[json_key]


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
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (see module docstring).

    Empty documents are skipped (they carry no text). Progress goes to stderr every few
    seconds, so only inputs that take that long print anything.
    """
    # Imported here: megatron.core pulls in torch and its whole package (~5 s, warnings), which
    # the CLI's --help and argument errors should not pay for.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    _check_inputs(inputs)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65500, else int32
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = f"{prefix}.bin{tag}", f"{prefix}.idx{tag}"
    t0 = last = time.perf_counter()
    docs = tokens = empty = 0
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    try:
        for batch in _batched(iter_texts(inputs, json_key), _BATCH_DOCS):
            texts = [t for t in batch if t]
            empty += len(batch) - len(texts)
            for ids in tokenizer.tokenize_batch(texts):
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                docs += 1
                tokens += len(ids)
            now = time.perf_counter()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                print(
                    f"preprocess: {docs} docs ({docs / (now - t0):.0f} docs/s), "
                    f"{tokens / 1e6:.2f}M tokens ({tokens / (now - t0) / 1e6:.2f}M tok/s)",
                    file=sys.stderr,
                    flush=True,
                )
        if docs == 0:
            raise ValueError(f"no non-empty documents in {', '.join(inputs)}")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        builder.data_file.close()  # no-op after finalize; frees the handle on errors
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.unlink(p)
    return PreprocessStats(
        documents=docs,
        tokens=tokens,
        skipped_empty=empty,
        dtype=np.dtype(dtype).name,
        seconds=time.perf_counter() - t0,
        prefix=prefix,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plt-preprocess",
        description="Tokenize .txt / .jsonl files into a megatron-core indexed dataset "
        "(<prefix>.bin + <prefix>.idx) for data.prefix=<prefix>.",
    )
    p.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="an existing HuggingFace tokenizer.json")
    tok.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a byte-level BPE on the inputs; saved as <prefix>.tokenizer.json",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="with --train-tokenizer (8192)")
    p.add_argument("--json-key", default="text", help="field holding the text in .jsonl lines")
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
        _check_inputs(args.input)
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
