"""Byte-level BPE tokenizer: a thin wrapper over HuggingFace ``tokenizers``.

Why a wrapper: megatron-core's ``GPTDataset`` only needs a duck-typed object with ``vocab_size``,
``eod`` and a JSON-serialisable ``unique_identifiers`` dict (hashed into its index-cache key).
Putting the tokenizer file's sha256 in that dict means a retrained tokenizer never silently
reuses sample indices built for another one.

Byte-level BPE is lossless: every byte has a token, so ``detokenize(tokenize(s)) == s`` for any
string. Special tokens written literally in the text (say ``"<|endoftext|>"`` inside a source
file) are encoded as ordinary bytes, so the eod id appears only where the pipeline puts it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
# Accepted when loading a tokenizer.json made elsewhere (GPT-2 style first, then Llama/T5 style).
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Tokenizer:
    """A HuggingFace tokenizer with the attributes megatron-core's GPTDataset reads.

    Attributes:
        vocab_size: number of ids including special tokens (before any model-side padding).
        eod: id of the end-of-document token appended after every document.
        sha256: hex digest of the serialised tokenizer (the file's bytes when loaded from one).
        unique_identifiers: JSON-serialisable identity for megatron's dataset cache key.
    """

    def __init__(self, hf: tokenizers.Tokenizer, sha256: Optional[str] = None) -> None:
        self.hf = hf
        # Not stored in tokenizer.json, so set it on every construction (see module docstring).
        self.hf.encode_special_tokens = True
        self.sha256 = sha256 or hashlib.sha256(self._serialise()).hexdigest()
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        eod = next((i for t in _EOD_CANDIDATES if (i := hf.token_to_id(t)) is not None), None)
        if eod is None:
            raise ValueError(
                f"tokenizer has no end-of-document token (looked for {', '.join(_EOD_CANDIDATES)}); "
                f"add {EOD_TOKEN!r} as a special token or train one with plt-preprocess "
                "--train-tokenizer"
            )
        self.eod: int = eod
        self._pad = next((i for t in _PAD_CANDIDATES if (i := hf.token_to_id(t)) is not None), None)
        self.unique_identifiers: dict = {
            "class": "plt_train.data.tokenizer.Tokenizer",
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    @property
    def pad(self) -> int:
        """Id of a pad token, if the vocabulary has one.

        Raises AttributeError otherwise, so ``getattr(tok, "pad", None)`` is None and megatron's
        GPTDataset falls back to its own pad id (-1, never a real token) instead of a bogus one.
        """
        if self._pad is None:
            raise AttributeError("this tokenizer has no pad token")
        return self._pad

    def _serialise(self) -> bytes:
        return self.hf.to_str().encode("utf-8")

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (uses the library's thread pool: much faster than a loop).
        ``encode_batch_fast`` gives the same ids without computing the offsets and token
        strings that ``encode_batch`` also returns (about 1.6x faster in plt-preprocess)."""
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically; its sha256 then equals ``self.sha256``."""
        data = self._serialise()
        _atomic_write_bytes(Path(path), data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.unique_identifiers["sha256"] = self.sha256

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json; a file that is not one raises ValueError naming the path."""
        data = Path(path).read_bytes()
        try:
            hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls(hf, sha256=hashlib.sha256(data).hexdigest())

    def __getstate__(self) -> dict:
        # Rebuild through __init__ on unpickle (DataLoader workers) so runtime-only settings
        # such as encode_special_tokens survive.
        return {"json": self.hf.to_str(), "sha256": self.sha256}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), sha256=state["sha256"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eod={self.eod}, sha256={self.sha256[:12]})"


def train_bpe(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike
) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 and save it to ``out_path``.

    Deterministic for the same texts and size (the trainer breaks count ties by pair order).
    The 256 byte symbols are always in the vocabulary, so nothing is ever out of vocabulary.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + eod), got {vocab_size}")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    tok = Tokenizer(hf)
    tok.save(out_path)
    return tok
