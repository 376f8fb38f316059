"""Weighted data mixtures (``data.mixture``, ``data.valid_mixture``): megatron-core's
BlendedDataset serves each member at its weight, the data order is a pure function of the
consumed samples (so a resumed run reads what the uninterrupted one would), validation can come
from its own mixture, and a missing or mismatched member is a one-line error before training.

megatron's BlendedDataset needs a process group (``one_rank``).  Two datasets with one shared tokenizer and disjoint words ("alpha ..." / "zulu ..."), so every
sample shows which member it came from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from plt_train.config import ConfigError
from plt_train.config.schema import DataConfig, MixtureMember, RunConfig
from plt_train.config.validate import validate
from plt_train.data.datasets import (
    DataError, build_data_iterator, build_datasets, check_data, mixture_proportions,
    prepare_data,
)
from plt_train.data.preprocess import preprocess
from plt_train.data.tokenizer import train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # megatron: "no TE / Apex"

WORDS = {"a": ["alpha", "bravo", "charlie"], "z": ["zulu", "yankee", "xray"]}
SEQ = 16


def _docs(key: str, n: int = 80) -> list[str]:
    w = WORDS[key]
    return [" ".join(w[(i + j) % 3] for j in range(5 + i % 7)) + "\n" for i in range(n)]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """Prefixes ``a`` and ``z`` preprocessed with one tokenizer (each has a copy of it as
    <prefix>.tokenizer.json), and the token ids each member uses."""
    d = tmp_path_factory.mktemp("mix")
    tok = train_bpe(_docs("a") + _docs("z"), 300, d / "shared.tokenizer.json")
    out = {"dir": d, "tokenizer": str(d / "shared.tokenizer.json")}
    for key in WORDS:
        jl = d / f"{key}.jsonl"
        jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(key)))
        preprocess([str(jl)], tok, str(d / key))
        shutil.copy(d / "shared.tokenizer.json", d / f"{key}.tokenizer.json")
        out[key] = str(d / key)
        out[f"ids_{key}"] = set(np.fromfile(f"{d / key}.bin", dtype=np.uint16).tolist())
    return out


def _member_of(sample_tokens, two) -> str:
    ids = set(sample_tokens.tolist())
    only_a, only_z = two["ids_a"] - two["ids_z"], two["ids_z"] - two["ids_a"]
    assert bool(ids & only_a) != bool(ids & only_z), "a sample mixes the members"
    return "a" if ids & only_a else "z"


def _cfg(two, mixture, valid=()) -> DataConfig:
    return DataConfig(prefix=None, mixture=[MixtureMember(two[k], w) for k, w in mixture],
                      valid_mixture=[MixtureMember(two[k], w) for k, w in valid])


def test_members_are_served_at_their_weights(one_rank, two, tmp_path):
    cfg = _cfg(two, [("a", 7.0), ("z", 3.0)])  # weights are normalised, as in Megatron-LM
    check_data(cfg)
    prepared = prepare_data(cfg)
    assert [w for _, w in prepared.mixture] == pytest.approx([0.7, 0.3])
    train, valid = build_datasets(prepared, SEQ, "90,10,0", 1, (2000, 100), str(tmp_path))
    shares = dict(mixture_proportions(train))
    assert shares[two["a"]] == pytest.approx(0.7, abs=0.01)
    assert shares[two["z"]] == pytest.approx(0.3, abs=0.01)
    # megatron's blend is greedy (each next sample from the member furthest below its
    # target), so even a short prefix of the order is close to the weights.
    first = dict(mixture_proportions(train, samples=100))
    assert first[two["a"]] == pytest.approx(0.7, abs=0.02)
    # Every sample is the member's data: its tokens say which member it came from.
    members = {two["a"]: "a", two["z"]: "z"}
    for i in range(0, 2000, 37):
        which = members[train.datasets[train.dataset_index[i]].dataset.path_prefix]
        assert _member_of(train[i]["tokens"], two) == which
    # Validation mixes the members' validation splits at the same weights.
    assert dict(mixture_proportions(valid))[two["a"]] == pytest.approx(0.7, abs=0.02)


def test_resuming_mid_mixture_reads_what_the_uninterrupted_run_reads(one_rank, two, tmp_path):
    """A resumed run rebuilds the blend (here in a fresh cache: nothing reused) and starts
    its iterator at the saved consumed samples; it must read the same batches as the run
    that never stopped, on every data-parallel rank."""
    prepared = prepare_data(_cfg(two, [("a", 0.5), ("z", 0.5)]))
    mbs, dp, steps, stop = 2, 2, 10, 6

    def batches(cache: Path, consumed: int, rank: int, n: int) -> list:
        train, _ = build_datasets(prepared, SEQ, "100,0,0", 3, (steps * mbs * dp, 0), str(cache))
        it = build_data_iterator(train, consumed, mbs, rank, dp)
        return [next(it)["tokens"] for _ in range(n)]

    for rank in range(dp):
        whole = batches(tmp_path / "first", 0, rank, steps)
        resumed = batches(tmp_path / f"resumed{rank}", stop * mbs * dp, rank, steps - stop)
        for a, b in zip(whole[stop:], resumed):
            assert np.array_equal(a.numpy(), b.numpy())
    assert {_member_of(t, two) for b in whole for t in b} == {"a", "z"}


def test_valid_mixture_replaces_the_split(one_rank, two, tmp_path):
    prepared = prepare_data(_cfg(two, [("a", 1.0)], valid=[("z", 1.0)]))
    train, valid = build_datasets(prepared, SEQ, "98,2,0", 1, (200, 50), str(tmp_path))
    assert {_member_of(train[i]["tokens"], two) for i in range(len(train))} == {"a"}
    assert {_member_of(valid[i]["tokens"], two) for i in range(len(valid))} == {"z"}
    # The training data is used whole: every document of ``a`` appears.
    assert len({int(d) for d in train.document_index}) == 80


def test_a_missing_member_is_one_line(two, tmp_path):
    cfg = DataConfig(prefix=None, mixture=[MixtureMember(two["a"]),
                                           MixtureMember(str(tmp_path / "nope"))])
    with pytest.raises(DataError, match=r"data\.mixture\[1\]=.*nope: missing .*nope\.bin"):
        check_data(cfg)


def test_a_member_made_with_another_tokenizer_is_refused(two, tmp_path):
    other = train_bpe(["def f(x):\n    return x\n"] * 20 + _docs("z"), 300,
                      tmp_path / "o.tokenizer.json")
    jl = tmp_path / "o.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs("z")))
    preprocess([str(jl)], other, str(tmp_path / "o"))
    cfg = DataConfig(prefix=None, mixture=[MixtureMember(two["a"]),
                                           MixtureMember(str(tmp_path / "o"))])
    with pytest.raises(DataError, match=r"data\.mixture\[1\]=.* another tokenizer"):
        check_data(cfg)


def test_a_member_with_another_token_dtype_is_refused(two, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(two["z"])
    builder = IndexedDatasetBuilder(str(tmp_path / "wide.bin"), dtype=np.int32)
    for i in range(len(source)):
        builder.add_document(np.asarray(source[i], dtype=np.int32), [len(source[i])])
    builder.finalize(str(tmp_path / "wide.idx"))
    cfg = DataConfig(prefix=None, tokenizer=two["tokenizer"],
                     mixture=[MixtureMember(two["a"]), MixtureMember(str(tmp_path / "wide"))])
    with pytest.raises(DataError, match=r"data\.mixture\[1\]=.* stores int32 tokens, "
                                        r"data\.mixture\[0\] uint16"):
        check_data(cfg)


@pytest.mark.parametrize("data,key", [
    (dict(prefix="x", mixture=[MixtureMember("y")]), "data.mixture"),
    (dict(prefix=None, mixture=[MixtureMember("y", 0.0)]), r"data.mixture\[0\].weight"),
    (dict(prefix=None, mixture=[MixtureMember("")]), r"data.mixture\[0\].prefix"),
    (dict(prefix=None, valid_mixture=[MixtureMember("y")]), "data.valid_mixture"),
])
def test_bad_mixture_configs_are_one_line_errors(data, key):
    cfg = RunConfig()
    cfg.data = DataConfig(**data)
    with pytest.raises(ConfigError, match=key):
        validate(cfg, 1)
