"""check_data, the embedded corpus, megatron GPT datasets and the pretraining sampler."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plt_train.config.schema import DataConfig
from plt_train.data.corpus import iter_source_files, stdlib_root, write_corpus
from plt_train.data.datasets import (
    DataError,
    PreparedData,
    build_data_iterator,
    build_datasets,
    cache_root,
    check_data,
    prepare_data,
)
from plt_train.data.preprocess import preprocess
from plt_train.data.tokenizer import Tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # megatron: "no TE / Apex"

REPO = Path(__file__).resolve().parents[2]
DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 5) for i in range(60)]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """60 tiny documents, a 300-id BPE, preprocessed to <dir>/data (+ data.tokenizer.json)."""
    d = tmp_path_factory.mktemp("small")
    tok = train_bpe(DOCS, 300, d / "data.tokenizer.json")
    jl = d / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    preprocess([str(jl)], tok, str(d / "data"))
    return PreparedData(prefix=str(d / "data"), tokenizer=tok)


def _copy(prepared: PreparedData, dst: Path, parts: tuple[str, ...]) -> str:
    prefix = str(dst / "copy")
    for part in parts:
        shutil.copy(prepared.prefix + part, prefix + part)
    return prefix


# --------------------------------------------------------------------------- check_data


def test_check_data_accepts_good_data_and_embedded(small: PreparedData) -> None:
    check_data(DataConfig(prefix=small.prefix))  # tokenizer found as <prefix>.tokenizer.json
    check_data(DataConfig(prefix=small.prefix, tokenizer=small.prefix + ".tokenizer.json"))
    check_data(DataConfig(prefix=None, cache_dir="/nonexistent/never/created"))


def test_check_data_missing_idx(small: PreparedData, tmp_path: Path) -> None:
    prefix = _copy(small, tmp_path, (".bin", ".tokenizer.json"))
    with pytest.raises(DataError, match=r"missing .*copy\.idx") as exc:
        check_data(DataConfig(prefix=prefix))
    assert "plt-preprocess" in str(exc.value) and ".bin" not in str(exc.value).split("(")[0]


def test_check_data_truncated_bin(small: PreparedData, tmp_path: Path) -> None:
    prefix = _copy(small, tmp_path, (".bin", ".idx", ".tokenizer.json"))
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(DataError, match=r"copy\.bin is truncated: \d+ bytes"):
        check_data(DataConfig(prefix=prefix))
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0" * 20)
    with pytest.raises(DataError, match="longer than its index"):
        check_data(DataConfig(prefix=prefix))


def test_check_data_garbage_or_truncated_idx(small: PreparedData, tmp_path: Path) -> None:
    prefix = _copy(small, tmp_path, (".bin", ".idx", ".tokenizer.json"))
    good = Path(prefix + ".idx").read_bytes()
    Path(prefix + ".idx").write_bytes(good[:-8])
    with pytest.raises(DataError, match="not a valid megatron index.*truncated or corrupt"):
        check_data(DataConfig(prefix=prefix))
    Path(prefix + ".idx").write_bytes(np.random.default_rng(0).bytes(len(good)))
    with pytest.raises(DataError, match="not a valid megatron index: wrong magic"):
        check_data(DataConfig(prefix=prefix))
    Path(prefix + ".idx").write_bytes(b"MMID")
    with pytest.raises(DataError, match="shorter than the header"):
        check_data(DataConfig(prefix=prefix))


def test_check_data_tokenizer(small: PreparedData, tmp_path: Path) -> None:
    prefix = _copy(small, tmp_path, (".bin", ".idx"))
    with pytest.raises(DataError, match=r"copy\.tokenizer\.json not found.*data\.tokenizer="):
        check_data(DataConfig(prefix=prefix))
    with pytest.raises(DataError, match="nope.json not found"):
        check_data(DataConfig(prefix=None, tokenizer=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        check_data(DataConfig(prefix=prefix, tokenizer=str(tmp_path / "bad.json")))


def test_check_data_token_ids_beyond_the_tokenizer(small: PreparedData, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Data made with another (larger) tokenizer used to fail at step 1 with an IndexError
    inside the embedding; now check_data names the id, once per file (the scan is cached)."""
    from plt_train.data.datasets import max_token_id, read_index

    monkeypatch.setenv("PLT_TRAIN_CACHE", str(tmp_path / "cache"))
    prefix = _copy(small, tmp_path, (".bin", ".idx", ".tokenizer.json"))
    check_data(DataConfig(prefix=prefix))
    dtype = read_index(prefix).dtype
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r+")
    tokens[len(tokens) // 2] = 4242
    tokens.flush()
    del tokens
    os.utime(prefix + ".bin", ns=(1, 1))  # a new modification time: the cached scan is stale
    with pytest.raises(DataError, match="holds token id 4242, beyond .* 300 ids"):
        check_data(DataConfig(prefix=prefix))
    assert len(list((tmp_path / "cache" / "max_token_id").iterdir())) == 2
    assert max_token_id(prefix, dtype, tmp_path / "cache") == 4242


def test_check_data_model_vocab_below_the_tokenizer(small: PreparedData) -> None:
    from plt_train.config import ConfigError

    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the "
                                          "tokenizer's 300 ids"):
        check_data(DataConfig(prefix=small.prefix), model_vocab_size=100)
    check_data(DataConfig(prefix=small.prefix), model_vocab_size=300)


def test_prepare_data_with_prefix(small: PreparedData) -> None:
    prepared = prepare_data(DataConfig(prefix=small.prefix))
    assert prepared.prefix == small.prefix
    assert prepared.tokenizer.sha256 == small.tokenizer.sha256


def test_cache_root_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLT_TRAIN_CACHE", str(tmp_path))
    assert cache_root(DataConfig(cache_dir="~/elsewhere")) == tmp_path
    monkeypatch.delenv("PLT_TRAIN_CACHE")
    assert cache_root(DataConfig(cache_dir="~/elsewhere")) == Path.home() / "elsewhere"


# --------------------------------------------------------------------------- datasets


def test_build_datasets_samples(small: PreparedData, tmp_path: Path) -> None:
    train, valid = build_datasets(small, 16, "80,20,0", 1234, (50, 10), str(tmp_path / "c"))
    assert len(train) >= 50 and valid is not None and len(valid) >= 10
    for i in (0, 1, len(train) - 1):
        s = train[i]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert s["tokens"].shape == s["labels"].shape == (16,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels = tokens shifted by one
        assert torch.equal(s["position_ids"], torch.arange(16))
        assert bool((s["loss_mask"] == 1).all())
    # Samples are windows of the token stream: a sample decodes to text of the documents.
    text = small.tokenizer.detokenize(train[0]["tokens"].tolist())
    assert "return x *" in text or "def f" in text
    assert any(f.endswith(".npy") for f in os.listdir(tmp_path / "c"))  # cache went there


def test_build_datasets_no_valid_and_bad_splits(small: PreparedData, tmp_path: Path) -> None:
    train, valid = build_datasets(small, 16, "100,0,0", 1, (10, 0), str(tmp_path))
    assert valid is None and len(train) >= 10
    # 60 docs at 999:1 leaves the valid split 0 documents: megatron would loop forever.
    with pytest.raises(DataError, match="valid split 0 of the 60 documents"):
        build_datasets(small, 16, "999,1,0", 1, (10, 10), str(tmp_path))
    with pytest.raises(DataError, match="non-negative weights"):
        build_datasets(small, 16, "a,b", 1, (10, 10), str(tmp_path))


def test_dataset_cache_key_follows_tokenizer(small: PreparedData, tmp_path: Path) -> None:
    other = train_bpe(DOCS, 280, tmp_path / "other.json")
    a, _ = build_datasets(small, 16, "100,0,0", 1, (10, 0), str(tmp_path / "c"))
    b, _ = build_datasets(
        PreparedData(small.prefix, other), 16, "100,0,0", 1, (10, 0), str(tmp_path / "c")
    )
    assert a.unique_description_hash != b.unique_description_hash
    assert len({f.split("-")[0] for f in os.listdir(tmp_path / "c")}) == 2


# --------------------------------------------------------------------------- sampler


class IndexDataset(torch.utils.data.Dataset):
    """Item i is filled with i, so batches show exactly which indices were drawn."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.full((3,), i), "loss_mask": torch.ones(3)}


def _ids(it, steps: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [next(it)["tokens"][:, 0].tolist() for _ in range(steps)]


def test_sampler_dp_split_resume_and_wrap() -> None:
    ds = IndexDataset(7)
    dp1 = _ids(build_data_iterator(ds, 0, 4, 0, 1), 3)
    assert dp1 == [[0, 1, 2, 3], [4, 5, 6, 0], [1, 2, 3, 4]]  # sequential, wraps at 7
    r0 = _ids(build_data_iterator(ds, 0, 2, 0, 2), 3)
    r1 = _ids(build_data_iterator(ds, 0, 2, 1, 2), 3)
    assert [a + b for a, b in zip(r0, r1)] == dp1
    resumed = _ids(build_data_iterator(ds, 4, 4, 0, 1), 2)
    assert resumed == dp1[1:]
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_data_iterator(ds, 0, 2, 2, 2)
    with pytest.raises(DataError, match="no samples"):
        build_data_iterator(IndexDataset(0), 0, 2, 0, 1)


def test_sampler_on_gpt_dataset(small: PreparedData, tmp_path: Path) -> None:
    train, _ = build_datasets(small, 16, "100,0,0", 7, (40, 0), str(tmp_path))
    n, k = len(train), 6
    b = next(build_data_iterator(train, 0, 3, 0, 1))
    assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["tokens"].shape == (3, 16)
    dp1 = [next(it) for it in [build_data_iterator(train, k, 4, 0, 1)] for _ in range(3)]
    it0, it1 = (build_data_iterator(train, k, 2, r, 2, num_workers=r) for r in (0, 1))
    for full in dp1:  # rank 1 reads through a worker process: same order
        halves = torch.cat([next(it0)["tokens"], next(it1)["tokens"]])
        assert torch.equal(halves, full["tokens"])
    skipped = build_data_iterator(train, 0, 1, 0, 1)
    for _ in range(k):
        next(skipped)
    assert torch.equal(next(skipped)["tokens"][0], dp1[0]["tokens"][0])
    wrap = next(build_data_iterator(train, n - 1, 2, 0, 1))["tokens"]
    assert torch.equal(wrap[0], train[n - 1]["tokens"]) and torch.equal(wrap[1], train[0]["tokens"])


# --------------------------------------------------------------------------- embedded corpus


def _fake_stdlib(root: Path) -> None:
    files = {
        "zeta.py": "z = 1\n",
        "pkg/mod.py": "import os\n",
        "pkg/test/test_mod.py": "x\n",
        "tests/t.py": "x\n",
        "site-packages/thing.py": "x\n",
        "dist-packages/thing.py": "x\n",
        "idlelib/idle_test/t.py": "x\n",
        "idlelib/editor.py": "e = 2\n",
        "alpha.py": "a = 0\n",
        "empty.py": "",
        "notes.txt": "not python\n",
    }
    for rel in reversed(list(files)):  # creation order must not matter
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(files[rel])
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")


def test_corpus_rules_on_a_fake_stdlib(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path / "lib")
    rel = [p.relative_to(tmp_path / "lib").as_posix() for p in iter_source_files(tmp_path / "lib")]
    assert rel == ["alpha.py", "empty.py", "idlelib/editor.py", "latin1.py", "pkg/mod.py",
                   "zeta.py"]
    stats = write_corpus(tmp_path / "c.jsonl", tmp_path / "lib")
    assert (stats.files, stats.skipped_non_utf8, stats.skipped_empty) == (4, 1, 1)
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["alpha.py", "idlelib/editor.py", "pkg/mod.py", "zeta.py"]
    assert rows[2]["text"] == "import os\n"
    write_corpus(tmp_path / "d.jsonl", tmp_path / "lib")
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "d.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "d.jsonl", "lib"]  # no temp files


def test_real_stdlib_corpus_is_clean_and_deterministic(tmp_path: Path) -> None:
    root = stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in iter_source_files()]
    assert rel == sorted(rel) and len(rel) > 500
    assert {"os.py", "json/__init__.py", "idlelib/editor.py"} <= set(rel)
    for r in rel:
        parts = r.split("/")
        assert not {"test", "tests", "site-packages", "dist-packages"} & set(parts), r
        assert not r.startswith("idlelib/idle_test/"), r
    a, b = write_corpus(tmp_path / "a.jsonl"), write_corpus(tmp_path / "b.jsonl")
    assert a == b and a.files > 500
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch.distributed as dist
    from plt_train.config.schema import DataConfig
    from plt_train.data import build_data_iterator, build_datasets, prepare_data

    rank, port, cache, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    cfg = DataConfig(vocab_size=512, cache_dir=cache)
    t = time.perf_counter()
    prepared = prepare_data(cfg)  # both ranks at once, no process group yet: the file lock
    t_prepare = time.perf_counter() - t
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    train, valid = build_datasets(prepared, 64, cfg.split, 1234, (64, 16),
                                  os.path.join(cache, "idx"))  # rank 0 builds, barrier
    it = build_data_iterator(train, 8, 2, rank, 2)
    tokens = [next(it)["tokens"].tolist() for _ in range(3)]
    dist.barrier()
    dist.destroy_process_group()
    json.dump({"t_prepare": t_prepare, "tokens": tokens, "len": len(train),
               "sha": prepared.tokenizer.sha256, "prefix": prepared.prefix}, open(out, "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_build_once_across_two_gloo_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one real embedded-corpus build (small vocab), raced by two ranks."""
    # The session's shared cache (the data_cache fixture sets it) would override cache_dir.
    monkeypatch.delenv("PLT_TRAIN_CACHE", raising=False)
    cache, port = tmp_path / "cache", str(_free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PLT_TRAIN_CACHE", None)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(r), port, str(cache), str(tmp_path / f"{r}")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    wall = time.perf_counter() - t0
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    res = [json.loads((tmp_path / f"{r}").read_text()) for r in (0, 1)]
    all_logs = "".join(logs)
    assert all_logs.count("building the embedded corpus once") == 1, all_logs
    assert res[0]["sha"] == res[1]["sha"] and res[0]["len"] == res[1]["len"] >= 64

    # In-process, no process group: a cache hit, and dp=1 sees the union of the two ranks.
    cfg = DataConfig(vocab_size=512, cache_dir=str(cache))
    t = time.perf_counter()
    prepared = prepare_data(cfg)
    t_hit = time.perf_counter() - t
    assert "building" not in capsys.readouterr().err and t_hit < 2.0
    assert prepared.prefix == res[0]["prefix"] and prepared.tokenizer.sha256 == res[0]["sha"]
    train, _ = build_datasets(prepared, 64, cfg.split, 1234, (64, 16), str(cache / "idx"))
    it = build_data_iterator(train, 8, 4, 0, 1)
    for step in range(3):
        assert next(it)["tokens"].tolist() == res[0]["tokens"][step] + res[1]["tokens"][step]

    marker = json.loads((Path(prepared.prefix).parent / "done.json").read_text())
    assert marker["documents"] > 500 and marker["tokens"] > 1_000_000
    assert prepared.tokenizer.vocab_size == 512
    with capsys.disabled():
        print(f"\n[embedded corpus, vocab 512] build by one of 2 ranks: "
              f"{max(r['t_prepare'] for r in res):.1f} s, {marker['tokens']} tokens in "
              f"{marker['documents']} docs; whole 2-rank run {wall:.1f} s; cache hit "
              f"{t_hit * 1000:.0f} ms")


def test_unigram_entropy_exact_then_sampled_in_chunks(small: PreparedData, monkeypatch) -> None:
    """Exact on a corpus up to ``max_tokens``; above it, counted over evenly spaced chunks
    (memory-mapped), never the whole file at once."""
    from plt_train.data import stats
    from plt_train.data.datasets import read_index

    tokens = np.fromfile(f"{small.prefix}.bin", dtype=read_index(small.prefix).dtype)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / tokens.size
    exact = float(-(p * np.log(p)).sum())
    monkeypatch.setattr(stats, "CHUNK", 64)
    assert stats.unigram_entropy(small.prefix, max_tokens=tokens.size) == pytest.approx(exact,
                                                                                        rel=1e-12)
    reads = []
    real_bincount = np.bincount
    monkeypatch.setattr(stats.np, "bincount", lambda a: reads.append(a.size) or real_bincount(a))
    sampled = stats.unigram_entropy(small.prefix, max_tokens=tokens.size // 4)
    assert sum(reads) <= tokens.size // 4 + 64 and max(reads) <= 64
    assert sampled != exact and sampled == pytest.approx(exact, rel=0.1)
