"""What makes a checkpoint trustworthy (issue 21): per-file checksums, the run's identity, and
one writer per checkpoint directory.

* **Checksums.**  Before a save is committed (the ``step_N.tmp`` -> ``step_N`` rename), every
  rank hashes a share of its files (round-robin over the sorted names, so the work spreads
  whatever megatron names its shards) and rank 0 writes ``checksums.json`` (SHA-256 and size
  per file).  A committed checkpoint therefore always carries its manifest, and it can be
  verified without building a model (``damage``).  Loading verifies first; a damaged or
  incomplete checkpoint is never loaded (``training/checkpoint.py`` falls back to the previous
  one).  Megatron-LM and torchtitan verify nothing: 4 KiB of random bytes inside a shard loads
  silently there and turns into NaN a step later.
* **Identity.**  What must not change when a run resumes: the shapes of the model (and so of
  every parameter and optimizer state), the tokenizer (its hash and size: a different
  tokenizer with the same size still means different tokens) and the MoE layout.  Saved in
  the checkpoint's common state and compared before loading, so a mismatch is one line naming
  the field instead of megatron's "Global shape mismatch" or a 2,600-character KeyError.  The
  parallel layout is not part of it: checkpoints reshard.
* **One writer.**  Rank 0 of a run holds a lock on the checkpoint directory (``filelock``, an
  ``flock`` released by the kernel when the process dies, also on SIGKILL) for the whole run.
  Two runs on one directory would otherwise delete each other's in-progress saves (each
  cleans up stale ``.tmp`` folders) and interleave ``latest.txt``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

MANIFEST = "checksums.json"
LOCK = ".writer.lock"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message is one line for the user."""


# -- checksums ---------------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"sha256": hashlib.file_digest(f, "sha256").hexdigest(),
                "bytes": os.fstat(f.fileno()).st_size}


def _share(names: list[str]) -> list[str]:
    """This rank's share of ``names`` (all of them without a process group)."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def gather_from_all(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_manifest(directory: str | os.PathLike) -> None:
    """Hash every file of ``directory`` (each rank a share) and write the manifest (rank 0).
    Collective: call on every rank, after every rank has finished writing."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    files: dict = {}
    for part in gather_from_all({n: _digest(directory / n) for n in _share(names)}):
        files.update(part)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = directory / f"{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError
        return files, None
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{MANIFEST} is unreadable"


def damage(directory: str | os.PathLike) -> str | None:
    """What is wrong with the checkpoint in ``directory`` (``"<file>: <problem>"``, the first
    by file name), or None when every file is there with its recorded size and checksum.
    Collective: every rank hashes a share of the files."""
    directory = Path(directory)
    files, problem = _read_manifest(directory)
    if files is None:
        return problem
    found = []
    for name in _share(sorted(files)):
        path = directory / name
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        got = _digest(path)
        if got["bytes"] != files[name].get("bytes"):
            found.append(f"{name}: {got['bytes']} bytes, {files[name].get('bytes')} recorded")
        elif got["sha256"] != files[name].get("sha256"):
            found.append(f"{name}: checksum mismatch")
    problems = sorted(p for part in gather_from_all(found) for p in part)
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") \
        if problems else None


# -- identity ----------------------------------------------------------------------------------
def run_identity(model, tokenizer) -> dict:
    """What must not change between a checkpoint and the run that resumes it (``model``: a
    ``ModelConfig``; ``tokenizer``: the run's ``Tokenizer``).  Keys are config paths."""
    ident = {
        "model.name": str(model.name),
        "model.loops": model.loops,
        "model.num_layers": model.num_layers,
        "model.hidden_size": model.hidden_size,
        "model.num_attention_heads": model.num_attention_heads,
        "model.num_query_groups": model.query_groups,
        "model.tie_embeddings": model.tie_embeddings,
        "padded vocabulary": model.padded_vocab_size(tokenizer.vocab_size),
        "model.moe.layer": str(model.moe.layer),
        "tokenizer vocabulary": tokenizer.vocab_size,
        "tokenizer sha256": tokenizer.sha256,
    }
    if model.uses_gswa:  # the gate's parameters differ with what it reads
        ident["model.loop.gate"] = str(model.loop.gate)
    if str(model.name) in ("looped", "plt") and model.loops > 1:  # as the scales below
        ident["model.loop.norm_between_loops"] = model.normed_loop_feed
    if model.parallel_loops:  # same parameters, another function: resumed, it would drift
        ident["model.loop.emb_scale"] = model.loop.emb_scale
        ident["model.loop.hidden_scale"] = model.loop.hidden_scale
    if str(model.moe.layer) == "dense":
        ident["model.ffn_hidden_size"] = model.ffn_size
    else:
        for key in ("num_experts", "ratio", "activation", "num_shared_experts"):
            value = getattr(model.moe, key)
            ident[f"model.moe.{key}"] = value if isinstance(value, (int, float)) else str(value)
    return ident


# Identity keys added after checkpoints were written without them, with the value every
# such checkpoint had: the default of that time (the loop input scales joined the identity
# when hidden_scale's default went from 1.0 to 0.05 (later 0.02: recorded since, so a run
# trained at 0.05 is refused at 0.02); the norm between loops when a looped model's default
# went from normed to raw).
IDENTITY_BEFORE_IT_WAS_RECORDED = {"model.loop.emb_scale": 1.0, "model.loop.hidden_scale": 1.0,
                                   "model.loop.norm_between_loops": True}


def identity_mismatch(saved: dict | None, current: dict) -> str | None:
    """``"<key>: <saved> in the checkpoint, <current> here"`` for the first difference (and
    how many more), or None.  A checkpoint without an identity is not compared; one without
    a key added later has that key's value of the time (``IDENTITY_BEFORE_IT_WAS_RECORDED``)."""
    if not saved:
        return None
    assumed = {k for k in IDENTITY_BEFORE_IT_WAS_RECORDED if k not in saved}
    saved = {**IDENTITY_BEFORE_IT_WAS_RECORDED, **saved}
    diffs = [f"{k}: {saved.get(k)}{' (assumed: not recorded then)' if k in assumed else ''} "
             f"in the checkpoint, {v} here" for k, v in current.items() if saved.get(k) != v]
    if not diffs:
        return None
    return diffs[0] + (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else "")


# -- one writer --------------------------------------------------------------------------------
class WriterLock:
    """Exclusive use of a checkpoint directory by one run (held by its rank 0)."""

    def __init__(self, directory: str | os.PathLike):
        from filelock import FileLock, Timeout

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.directory / LOCK))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is in use by another run (it holds "
                f"{LOCK}); wait for that run, or give this one another name or checkpoint.dir"
            ) from None

    def release(self) -> None:
        self._lock.release()
