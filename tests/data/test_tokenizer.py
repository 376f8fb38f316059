"""Byte-level BPE: lossless round trip, determinism, identity hash, pickling."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from plt_train.data.tokenizer import EOD_TOKEN, Tokenizer, train_bpe

TEXTS = [
    "def add(x, y):\n    return x + y\n",
    "class Foo:\n\t'''Docstring with tabs.'''\r\n    pass\n",
    "héllo wörld — ünïcode, 日本語, emoji 😀 and   runs   of spaces\n",
    "for i in range(10):\n    print(i ** 2)  # squares\n",
] * 8

UNSEEN = [
    "",
    "zzz qqq ~~~ \x00\x01 control bytes",
    "  leading spaces and trailing  ",
    "mixed\r\nline\rendings\n",
    "Ω≈ç√∫ ùñíçødé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"a literal {EOD_TOKEN} inside text",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_bpe(TEXTS, 320, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_round_trip_is_exact(tok: Tokenizer) -> None:
    for text in TEXTS[:4] + UNSEEN:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # BPE actually merged something: fewer tokens than bytes on the training text.
    assert len(tok.tokenize(TEXTS[0])) < len(TEXTS[0].encode())


def test_eod_is_special_and_only_where_we_put_it(tok: Tokenizer) -> None:
    assert tok.eod == tok.hf.token_to_id(EOD_TOKEN)
    assert tok.detokenize([tok.eod]) == EOD_TOKEN
    # Literal "<|endoftext|>" in a document is text, not a document boundary.
    assert tok.eod not in tok.tokenize(f"x {EOD_TOKEN} y")
    assert getattr(tok, "pad", None) is None  # no pad token: megatron falls back to -1


def test_batch_matches_single(tok: Tokenizer) -> None:
    assert tok.tokenize_batch(UNSEEN) == [tok.tokenize(t) for t in UNSEEN]


def test_vocab_size_and_training_is_deterministic(tmp_path: Path, tok: Tokenizer) -> None:
    assert 257 <= tok.vocab_size <= 320
    again = train_bpe(TEXTS, 320, tmp_path / "again.json")
    assert again.sha256 == tok.sha256
    assert (tmp_path / "again.json").read_bytes() == tok.hf.to_str().encode()


def test_save_load_and_file_hash(tmp_path: Path, tok: Tokenizer) -> None:
    path = tmp_path / "sub" / "t.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256
    assert loaded.unique_identifiers["sha256"] == loaded.sha256
    assert loaded.tokenize(UNSEEN[4]) == tok.tokenize(UNSEEN[4])
    assert (loaded.vocab_size, loaded.eod) == (tok.vocab_size, tok.eod)


def test_unique_identifiers_change_with_tokenizer(tmp_path: Path, tok: Tokenizer) -> None:
    other = train_bpe(TEXTS, 300, tmp_path / "other.json")
    assert other.unique_identifiers != tok.unique_identifiers
    assert other.unique_identifiers["sha256"] != tok.unique_identifiers["sha256"]
    # Megatron json.dumps()es it into the dataset cache key.
    json.dumps(tok.unique_identifiers)


def test_pickle_keeps_identity_and_literal_special_handling(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256
    assert clone.tokenize(UNSEEN[5]) == tok.tokenize(UNSEEN[5])
    assert clone.eod not in clone.tokenize(UNSEEN[5])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(TEXTS, 100, tmp_path / "small.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a valid tokenizer.json"):
        Tokenizer.load(bad)
