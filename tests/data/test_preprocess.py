"""Text -> indexed dataset: content, dtype, atomicity, and the plt-preprocess CLI."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plt_train.data import preprocess as preprocess_mod_function  # the re-exported function
from plt_train.data.preprocess import main, preprocess
from plt_train.data.tokenizer import Tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # megatron: "no TE / Apex"

DOCS_TXT = ["first document\nwith two lines\n", "second: ünïcode 😀\n"]
DOCS_JSONL = ["import os\nprint(os.getcwd())\n", "x = {'a': 1}\n", "last one"]


@pytest.fixture()
def inputs(tmp_path: Path) -> list[str]:
    paths = []
    for i, text in enumerate(DOCS_TXT):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(str(p))
    jl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "meta": i}) for i, t in enumerate(DOCS_JSONL)]
    lines.insert(1, "")  # blank lines are ignored
    lines.append(json.dumps({"text": ""}))  # an empty document is skipped
    jl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths.append(str(jl))
    return paths


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    texts = (DOCS_TXT + DOCS_JSONL) * 4
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _read(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    # Copy: items are views into an mmap that megatron closes explicitly when ``ds`` is
    # collected, and touching such a view afterwards is a segfault, not an exception.
    return [np.array(ds[i]) for i in range(len(ds))]


def test_documents_decode_back_with_eod(tmp_path: Path, inputs: list[str], tok: Tokenizer) -> None:
    prefix = str(tmp_path / "out" / "data")
    stats = preprocess(inputs, tok, prefix)
    docs = _read(prefix)
    expected = DOCS_TXT + DOCS_JSONL
    assert len(docs) == stats.documents == len(expected)
    assert stats.skipped_empty == 1
    for ids, text in zip(docs, expected):
        assert ids.dtype == np.uint16 and stats.dtype == "uint16"
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1].tolist()) == text
    assert stats.tokens == sum(len(d) for d in docs)
    leftovers = sorted(os.listdir(tmp_path / "out"))
    assert leftovers == ["data.bin", "data.idx"]  # no temp files left behind
    assert preprocess_mod_function is preprocess


def test_no_eod_and_json_key(tmp_path: Path, tok: Tokenizer) -> None:
    jl = tmp_path / "k.jsonl"
    jl.write_text(json.dumps({"body": "abc abc"}) + "\n")
    preprocess([str(jl)], tok, str(tmp_path / "k"), json_key="body", append_eod=False)
    (ids,) = _read(str(tmp_path / "k"))
    assert tok.detokenize(ids.tolist()) == "abc abc" and tok.eod not in ids


def test_int32_for_big_vocab(tmp_path: Path, tok: Tokenizer) -> None:
    class Big:  # duck-typed: a vocabulary too big for uint16
        vocab_size, eod = 70_000, 69_999

        def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
            return [[65_600 + len(t)] for t in texts]

    p = tmp_path / "a.txt"
    p.write_text("hello")
    stats = preprocess([str(p)], Big(), str(tmp_path / "big"))  # type: ignore[arg-type]
    (ids,) = _read(str(tmp_path / "big"))
    assert stats.dtype == "int32" and ids.dtype == np.int32
    assert ids.tolist() == [65_605, 69_999]


def test_bad_json_leaves_nothing(tmp_path: Path, tok: Tokenizer) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        preprocess([str(jl)], tok, str(tmp_path / "o" / "x"))
    assert os.listdir(tmp_path / "o") == []
    jl.write_text(json.dumps({"content": "no text key"}) + "\n")
    with pytest.raises(ValueError, match="string field 'text'"):
        preprocess([str(jl)], tok, str(tmp_path / "o" / "x"))


def test_progress_goes_to_stderr(
    tmp_path: Path, inputs: list[str], tok: Tokenizer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Not `import plt_train.data.preprocess as mod`: the package re-exports the *function*
    # preprocess under that name, and `import a.b as m` reads the package attribute.
    mod = importlib.import_module("plt_train.data.preprocess")

    monkeypatch.setattr(mod, "_PROGRESS_EVERY_S", 0.0)
    preprocess(inputs, tok, str(tmp_path / "p"))
    err = capsys.readouterr().err
    assert "docs/s" in err and "M tokens" in err
    assert "100%" in err and "preprocess" in err  # bytes of the inputs read, as a percentage


def test_cli_train_then_reuse_tokenizer(tmp_path: Path, inputs: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    a = str(tmp_path / "a" / "data")
    assert main(["--input", *inputs, "--output-prefix", a, "--train-tokenizer",
                 "--vocab-size", "300"]) == 0
    assert "train tokenizer" in capsys.readouterr().err  # its own progress bar over the bytes
    tok_path = Path(f"{a}.tokenizer.json")
    tok = Tokenizer.load(tok_path)
    docs = _read(a)
    assert [tok.detokenize(d[:-1].tolist()) for d in docs] == DOCS_TXT + DOCS_JSONL
    b = str(tmp_path / "b" / "data")
    assert main(["--input", *inputs, "--output-prefix", b, "--tokenizer", str(tok_path)]) == 0
    assert Path(f"{a}.bin").read_bytes() == Path(f"{b}.bin").read_bytes()
    assert Path(f"{a}.idx").read_bytes() == Path(f"{b}.idx").read_bytes()


def test_cli_missing_input_is_a_clean_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(SystemExit) as exc:
        main(["--input", missing, "--output-prefix", str(tmp_path / "x"), "--train-tokenizer"])
    assert exc.value.code not in (0, None)
    assert "input file not found" in str(exc.value.code) and missing in str(exc.value.code)
    assert not list(tmp_path.iterdir())
    # Also as a real process: non-zero status, one-line message, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "plt_train.preprocess", "--input", missing,
         "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "t.json")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
    )
    assert proc.returncode != 0
    assert "input file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_usage_errors(tmp_path: Path, inputs: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # neither --tokenizer nor --train-tokenizer
        main(["--input", *inputs, "--output-prefix", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--input", *inputs, "--output-prefix", str(tmp_path / "x"),
              "--tokenizer", str(tmp_path / "missing.json")])
    assert "missing.json" in str(exc.value.code)


def test_cli_non_utf8_names_file_and_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A latin-1 byte used to surface as a bare UnicodeDecodeError (no file, no line)."""
    jl, txt, out = tmp_path / "bad.jsonl", tmp_path / "bad.txt", tmp_path / "out"
    good = json.dumps({"text": "fine " * 50}) + "\n"
    jl.write_bytes(good.encode() * 2 + b'{"text": "caf\xe9"}\n')
    txt.write_bytes("first line\n".encode() + b"second \xff line\n")
    out.mkdir()
    for path, line in ((jl, 3), (txt, 2)):
        with pytest.raises(SystemExit) as exc:
            main(["--input", str(path), "--output-prefix", str(out / "x"), "--train-tokenizer",
                  "--vocab-size", "300"])
        assert f"{path}:{line}: not UTF-8" in str(exc.value.code)
        assert list(out.iterdir()) == []  # no tokenizer, .bin or .idx left behind


# --------------------------------------------------------------------------- formats, writer


@pytest.mark.parametrize("vocab", [300, 70000], ids=["uint16", "int32"])
def test_writer_is_byte_identical_to_megatrons_builder(tmp_path: Path, vocab: int) -> None:
    """plt-preprocess writes megatron's format without importing megatron-core."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from plt_train.data.indexed import IndexedWriter, optimal_dtype

    dtype = optimal_dtype(vocab)
    assert dtype == np.dtype(DType.optimal_dtype(vocab))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, min(vocab, 65535), size=n) for n in (5, 1, 300, 17)]
    ours = IndexedWriter(str(tmp_path / "ours.bin"), dtype)
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype.type)
    for d in docs:
        ours.add_document(d)
        theirs.add_document(np.asarray(d, dtype=dtype), [len(d)])
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def _write_inputs(folder: Path, texts: list[str]) -> dict[str, str]:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst, .parquet (two row groups) and a
    Hugging Face ``save_to_disk`` folder (Arrow stream files listed in state.json)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    (folder / "d.jsonl").write_bytes(lines)
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, folder / "d.parquet", row_group_size=2)
    hf = folder / "hf"
    hf.mkdir()
    for i, part in enumerate((table.slice(0, 2), table.slice(2))):
        with pa.OSFile(str(hf / f"data-0000{i}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, part.schema) as writer:
                writer.write_table(part, max_chunksize=1)
    (hf / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    return {"jsonl": str(folder / "d.jsonl"), "gz": str(folder / "d.jsonl.gz"),
            "zst": str(folder / "d.jsonl.zst"), "parquet": str(folder / "d.parquet"),
            "hf": str(hf)}


def test_every_input_format_gives_the_same_dataset(tmp_path: Path, tok: Tokenizer) -> None:
    texts = DOCS_JSONL + ["", "one more\n"]  # the empty document is skipped everywhere
    inputs = _write_inputs(tmp_path / "in", texts)
    outputs = {}
    for name, path in inputs.items():
        stats = preprocess([path], tok, str(tmp_path / name / "x"))
        assert stats.documents == 4 and stats.skipped_empty == 1, name
        outputs[name] = [Path(f"{tmp_path / name / 'x'}{e}").read_bytes() for e in (".bin", ".idx")]
    assert all(out == outputs["jsonl"] for out in outputs.values())
    docs = _read(str(tmp_path / "jsonl" / "x"))
    assert [tok.detokenize(d[:-1].tolist()) for d in docs] == [t for t in texts if t]


def test_glob_patterns_and_a_text_column(tmp_path: Path, tok: Tokenizer) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, text in enumerate(DOCS_JSONL):
        (parts / f"p{i}.jsonl").write_text(json.dumps({"content": text}) + "\n")
    assert main(["--input", str(parts / "p*.jsonl"), "--output-prefix", str(tmp_path / "g"),
                 "--train-tokenizer", "--vocab-size", "300", "--text-key", "content"]) == 0
    g = Tokenizer.load(f"{tmp_path / 'g'}.tokenizer.json")
    assert [g.detokenize(d[:-1].tolist()) for d in _read(str(tmp_path / "g"))] == DOCS_JSONL
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(parts / "q*.jsonl"), "--output-prefix", str(tmp_path / "h"),
              "--train-tokenizer"])
    assert "no input matches the pattern" in str(exc.value.code)


def test_a_missing_column_names_the_columns(tmp_path: Path, tok: Tokenizer) -> None:
    inputs = _write_inputs(tmp_path / "in", DOCS_JSONL)
    for name in ("parquet", "hf"):
        with pytest.raises(ValueError, match=r"no column 'body' \(columns: id, text"):
            preprocess([inputs[name]], tok, str(tmp_path / name), json_key="body")
    with pytest.raises(ValueError, match="not a Hugging Face datasets folder"):
        preprocess([str(tmp_path)], tok, str(tmp_path / "o"))


LAST_PARAGRAPH = "word " * 40 + "\n" + "and a last line without a newline at the end " * 3
LONG_TXT = ("Chapter one.\n\nIt was  a dark and stormy night; the rain fell in torrents.\n"
            "ünïcode ☃ 😀 and a   few    spaces.\n\n\n" + LAST_PARAGRAPH)


def _ids(prefix) -> list[list[int]]:
    return [a.tolist() for a in _read(str(prefix))]


def test_a_long_txt_is_written_in_pieces_with_the_ids_of_the_whole_text(
        tmp_path: Path, tok: Tokenizer, monkeypatch) -> None:
    """One document per file, read in pieces of at most 48 bytes (cut between the newlines
    of a blank line, after a newline or before a space): the same ids as the whole text."""
    mod = importlib.import_module("plt_train.data.preprocess")

    path = tmp_path / "book.txt"
    path.write_text(LONG_TXT, encoding="utf-8")
    monkeypatch.setattr(mod, "_TXT_PIECE_BYTES", 48)
    pieces = list(mod._txt_pieces(str(path), "file", lambda n: None))
    assert len(pieces) > 10 and [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(text for text, _ in pieces) == LONG_TXT
    stats = preprocess([str(path)], tok, str(tmp_path / "out"))
    assert stats.documents == 1 and _ids(tmp_path / "out") == [tok.tokenize(LONG_TXT) + [tok.eod]]
    assert stats.tokens == len(tok.tokenize(LONG_TXT)) + 1


def test_txt_documents_per_paragraph_and_per_line(tmp_path: Path, tok: Tokenizer,
                                                  monkeypatch) -> None:
    mod = importlib.import_module("plt_train.data.preprocess")

    path = tmp_path / "book.txt"
    path.write_text(LONG_TXT, encoding="utf-8")
    monkeypatch.setattr(mod, "_TXT_PIECE_BYTES", 48)  # the long paragraph comes in pieces
    paragraphs = ["Chapter one.\n",
                  "It was  a dark and stormy night; the rain fell in torrents.\n"
                  "ünïcode ☃ 😀 and a   few    spaces.\n", LAST_PARAGRAPH]
    preprocess([str(path)], tok, str(tmp_path / "p"), txt_documents="paragraphs")
    assert _ids(tmp_path / "p") == [tok.tokenize(p) + [tok.eod] for p in paragraphs]
    stats = preprocess([str(path)], tok, str(tmp_path / "l"), txt_documents="lines")
    lines = [line for line in LONG_TXT.split("\n") if line]
    assert _ids(tmp_path / "l") == [tok.tokenize(line) + [tok.eod] for line in lines]
    assert stats.skipped_empty == LONG_TXT.count("\n") + 1 - len(lines)


def test_memory_stays_bounded_on_a_large_single_document_txt(tmp_path: Path) -> None:
    """An 8 MB .txt that is one document stays within a few hundred MB (measured 2026-12-05:
    478 MiB at 24 MB and 526 MiB at 48 MB, tokenizer training included; the reader that read
    and encoded it at once peaked at 4538 MiB at 24 MB): 1 MiB pieces, encoded and written a
    batch of at most 4 MiB at a time."""
    path = tmp_path / "big.txt"
    paragraph = ("The quick brown fox jumps over the lazy dog, again and again. " * 12 + "\n") * 4
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 8 * 2**20:
            f.write(paragraph + "\n")
    out = tmp_path / "big"
    code = (
        "import resource, sys; from plt_train.data.preprocess import main; "
        f"rc = main(['--input', {str(path)!r}, '--output-prefix', {str(out)!r}, "
        "'--train-tokenizer', '--vocab-size', '512']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mib = int(proc.stdout.split()[-1]) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    (doc,) = _read(str(out))
    assert len(doc) > 500_000


def test_workers_write_shards_merged_into_the_one_process_bytes(
        tmp_path: Path, inputs: list[str], tok: Tokenizer) -> None:
    """Two processes over four files (runs of files of about equal size), each a shard,
    merged in input order: byte-identical to one process, and no shard left behind."""
    from plt_train.data.preprocess import _groups

    more = tmp_path / "more.txt"
    more.write_text(LONG_TXT, encoding="utf-8")
    files = inputs + [str(more)]
    assert [len(g) for g in _groups(files, 2)] == [3, 1]  # more.txt is most of the bytes
    groups = _groups(files * 4, 3)
    sizes = [sum(os.path.getsize(f) for f in g) for g in groups]
    assert sum(groups, []) == files * 4 and len(groups) == 3
    assert max(sizes) - min(sizes) <= max(os.path.getsize(f) for f in files)
    one = preprocess(files, tok, str(tmp_path / "one" / "d"))
    two = preprocess(files, tok, str(tmp_path / "two" / "d"), workers=2)
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/one/d{ext}").read_bytes() == \
            Path(f"{tmp_path}/two/d{ext}").read_bytes()
    assert (two.documents, two.tokens, two.skipped_empty) == \
        (one.documents, one.tokens, one.skipped_empty)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["d.bin", "d.idx"]


def test_merge_concatenates_datasets_as_megatrons_builder_does(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from plt_train.data.indexed import IndexedWriter, merge

    parts = [[[1, 2, 3], [4]], [[5, 6]], [[7], [8, 9, 10, 11]]]
    for i, docs in enumerate(parts):
        w = IndexedWriter(str(tmp_path / f"p{i}.bin"), np.uint16)
        for d in docs:
            w.add_document(d)
        w.finalize(str(tmp_path / f"p{i}.idx"))
    merge([str(tmp_path / f"p{i}") for i in range(3)], str(tmp_path / "m.bin"),
          str(tmp_path / "m.idx"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for i in range(3):
        builder.add_index(str(tmp_path / f"p{i}"))
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"m.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    assert [a.tolist() for a in _read(str(tmp_path / "m"))] == [d for p in parts for d in p]
