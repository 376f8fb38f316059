"""The embedded default corpus: the running interpreter's standard-library sources.

Why this corpus: it is on every machine that can run us (no download, no network), it is a
realistic ~12 MB of code and prose-like docstrings, and for a given Python version it is the
same everywhere, so a smoke-test run is reproducible. What varies by machine is left out:
site-packages / dist-packages (whatever happens to be installed) and the test suites (large,
repetitive and partly not UTF-8).
"""
from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

# Folder names pruned anywhere below the stdlib root.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
# Folders pruned by their path relative to the stdlib root.
EXCLUDED_RELATIVE = frozenset({"idlelib/idle_test"})


@dataclass(frozen=True)
class CorpusStats:
    files: int  # documents written
    skipped_non_utf8: int
    skipped_empty: int
    bytes: int  # UTF-8 bytes of text written


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Optional[Path] = None) -> list[Path]:
    """All ``*.py`` files under ``root`` (default: the stdlib), minus exclusions, sorted.

    Sorted by relative POSIX path so the document order (and hence the trained tokenizer and the
    token stream) does not depend on the file system's directory order.
    """
    root = Path(root) if root is not None else stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [
            d
            for d in dirnames
            if d not in EXCLUDED_DIRS
            and (d if rel_dir == "." else f"{rel_dir}/{d}") not in EXCLUDED_RELATIVE
        ]
        for name in filenames:
            if name.endswith(".py"):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return [root / rel for rel in sorted(found)]


def iter_documents(root: Optional[Path] = None) -> Iterator[tuple[str, Optional[str]]]:
    """Yield ``(relative_path, text)``; text is None for a file that is not valid UTF-8."""
    root = Path(root) if root is not None else stdlib_root()
    for path in iter_source_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            yield rel, path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            yield rel, None


def write_corpus(out_path: str | os.PathLike, root: Optional[Path] = None) -> CorpusStats:
    """Write the corpus as JSONL (``{"text", "path"}`` per line) atomically.

    Empty files (many ``__init__.py``) are skipped: they would only add lone eod tokens.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = non_utf8 = empty = nbytes = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rel, text in iter_documents(root):
                if text is None:
                    non_utf8 += 1
                    continue
                if not text:
                    empty += 1
                    continue
                f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
                files += 1
                nbytes += len(text.encode("utf-8"))
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return CorpusStats(files=files, skipped_non_utf8=non_utf8, skipped_empty=empty, bytes=nbytes)


def ensure_corpus(cache_dir: str | os.PathLike, root: Optional[Path] = None) -> Path:
    """Return ``<cache_dir>/corpus.jsonl``, writing it first if absent (build once).

    Not locked: callers that may race (several ranks) hold the lock in ``prepare_data``; an
    unlocked race is still safe, only wasteful, because the write is atomic.
    """
    path = Path(cache_dir) / "corpus.jsonl"
    if not path.exists():
        write_corpus(path, root)
    return path


def read_jsonl_texts(path: str | os.PathLike, key: str = "text") -> Iterator[str]:
    """Texts of a JSONL corpus, in file order (used to train the tokenizer on the corpus)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[key]
