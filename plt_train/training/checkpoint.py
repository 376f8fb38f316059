"""Checkpoints with ``megatron.core.dist_checkpointing``: resharding-friendly and atomic.

Layout of ``<dir>``::

    latest.txt            name of the newest complete checkpoint (replaced atomically)
    step_0000100/         a complete dist_checkpointing directory, with checksums.json
    step_0000200.tmp/     a save in progress (or one that crashed): never loaded
    .writer.lock          held by rank 0 of the run writing here (integrity.WriterLock)

A save writes into ``step_N.tmp``; only when every rank has finished does rank 0 rename it to
``step_N`` and then point ``latest.txt`` at it (write + ``os.replace``).  A crash or kill at any
moment therefore leaves the previous checkpoint as the latest loadable one.  Before the rename
every rank hashes a share of the files into ``checksums.json``; a resume verifies them and
falls back to an older checkpoint when the newest is damaged (``resume``, ``integrity.py``).

What is saved: model and optimizer (sharded tensors, so another TP/PP layout can load them),
the LR schedule, the step and consumed samples (the data position), and each rank's RNG states.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from plt_train.runtime.console import say
from plt_train.training.checkpoint_writers import WriterWatch, watched_writers

LATEST = "latest.txt"
# Written by megatron's dist_checkpointing.save into every checkpoint directory: a folder
# without it (an empty ``step_N``, a typo'd path) is not a checkpoint.
MARKER = "metadata.json"
# DistributedOptimizer state format (ignored by the plain optimizer).  megatron-core 0.16.1's
# default, 'fully_sharded_model_space', produces flattened ShardedTensors its own torch_dist
# writer refuses; 'dp_reshardable' is Megatron-LM's default (reshardable across DP sizes).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _unwrap(chunk):
    """Keys are the bare model's (no DDP ``module.`` prefix), as in Megatron-LM checkpoints."""
    return getattr(chunk, "module", chunk)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    state = {"torch": torch.get_rng_state(),
             "tracker": mrandom.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(chunks, optimizer, scheduler, state: TrainState, loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    assert len(chunks) == 1, "one model chunk per stage"
    model_sd = _unwrap(chunks[0]).sharded_state_dict()
    world, rank = dist.get_world_size(), dist.get_rank()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                  metadata=OPTIMIZER_METADATA),
        "scheduler": scheduler.state_dict(),
        "train_state": {"step": state.step, "consumed_samples": state.consumed_samples,
                        "world_size": world},
        # RNG differs per rank: one object per global rank, restored only at the same world size.
        "rng": ShardedObject(f"rng_state_world{world}", _rng_state(), (world,), (rank,),
                             replica_id=0),
    }


def _everywhere(errors: list) -> str | None:
    """The first error any rank met (every rank learns it), or None."""
    from plt_train.training.integrity import gather_from_all

    found = [e for e in gather_from_all(errors[0] if errors else None) if e]
    return found[0] if found else None


def _on_rank0(action) -> str | None:
    """Run ``action`` on rank 0; every rank gets its error message (or None)."""
    errors = []
    if dist.get_rank() == 0:
        try:
            action()
        except OSError as err:
            errors.append(f"{type(err).__name__}: {err}")
    return _everywhere(errors)


@dataclass
class PendingSave:
    """A save whose shards are written (or being written, for an asynchronous save) into
    ``tmp`` and that is not committed yet."""
    root: Path
    step: int
    tmp: Path
    final: Path
    started: float
    request: object = None  # megatron's AsyncRequest, for an asynchronous save

    def failed(self, error: str) -> Exception:
        """The one-line ``CheckpointError`` for this save, after removing its ``step_N.tmp``
        (collective: every rank calls it with the error they agreed on)."""
        from plt_train.training.integrity import CheckpointError

        _on_rank0(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        latest = latest_checkpoint(self.root)
        error = _disk_full(self.root, latest) or error
        return CheckpointError(f"saving step {self.step} to {self.root} failed ({error}); "
                               f"{latest.name if latest else 'no checkpoint'} is still the "
                               "latest")


def start_save(root: str | os.PathLike, chunks, optimizer, scheduler, state: TrainState,
               identity: dict | None = None, watch: WriterWatch = WriterWatch(),
               async_save: bool = False) -> PendingSave:
    """Write step ``state.step`` into ``step_N.tmp`` (collective).  Synchronous: the shards
    are on disk when it returns.  ``async_save``: the returned save carries megatron's
    ``AsyncRequest``, to be scheduled in an ``AsyncCallsQueue`` and finalized there before
    ``commit_save``.  The writer processes are watched either way (``checkpoint_writers``)."""
    import time

    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    final = _step_dir(root, state.step)
    pending = PendingSave(root, state.step, Path(f"{final}.tmp"), final, time.perf_counter())

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # a crashed save of this run (the lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        pending.tmp.mkdir()

    error = _on_rank0(prepare)
    if error:
        raise pending.failed(error)
    errors = []
    try:
        sharded = _sharded_state(chunks, optimizer, scheduler, state, loading=False)
        sharded["train_state"]["identity"] = identity
        with watched_writers(watch):
            pending.request = dist_checkpointing.save(sharded, str(pending.tmp),
                                                      async_sharded_save=async_save)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException: BaseException
        errors.append(_first_line(err))
    error = _everywhere(errors)
    if error:
        raise pending.failed(error)
    return pending


def commit_save(pending: PendingSave, before_commit=None) -> Path:
    """Make a written save the latest checkpoint (collective): every rank hashes a share of
    its files into ``checksums.json``, then rank 0 renames ``step_N.tmp`` to ``step_N`` and
    points ``latest.txt`` at it.  ``before_commit`` is a test hook called after every rank
    wrote its shards and before the checkpoint becomes visible (so a test can simulate a
    crash at the worst moment)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from plt_train.training.integrity import write_manifest

    errors = []
    try:
        dist.barrier()
        write_manifest(pending.tmp)
    except (Exception, CheckpointException) as err:
        errors.append(_first_line(err))
    error = _everywhere(errors)
    if error:
        raise pending.failed(error)
    dist.barrier()
    if before_commit is not None:
        before_commit(pending.tmp)

    def commit():
        if pending.final.exists():  # re-saving a step (e.g. a signal right after a save)
            shutil.rmtree(pending.final)
        os.replace(pending.tmp, pending.final)
        _write_atomic(pending.root / LATEST, pending.final.name)

    error = _on_rank0(commit)
    if error:
        raise pending.failed(error)
    return pending.final


def finalize_async(queue, pending: PendingSave, blocking: bool) -> bool:
    """Whether the background writes of ``pending`` (scheduled in megatron's
    ``AsyncCallsQueue`` ``queue``) have ended on every rank and been finalized (collective;
    ``blocking`` waits for them).  A failure on any rank is this save's one-line
    ``CheckpointError`` on every rank.  Commit with ``commit_save`` after it returns True."""
    from torch.distributed.checkpoint.api import CheckpointException

    errors, done = [], []
    try:
        done = queue.maybe_finalize_async_calls(blocking=blocking)
    except (Exception, CheckpointException) as err:  # every rank raises (DCP's finalize)
        errors.append(_first_line(err))
    error = _everywhere(errors)
    if error:
        raise pending.failed(error)
    return bool(done)


def save_checkpoint(root: str | os.PathLike, chunks, optimizer, scheduler,
                    state: TrainState, before_commit=None, identity: dict | None = None,
                    watch: WriterWatch = WriterWatch()) -> Path:
    """Save step ``state.step`` atomically and synchronously, with the checksums of its
    files; returns the final directory.  ``identity`` (``integrity.run_identity``) is what a
    resuming run must match.

    Any failure (a full disk, an unwritable directory, a writer killed or past
    ``watch.timeout_s``) is agreed on by every rank and raised as one-line
    ``CheckpointError`` after the partial ``step_N.tmp`` is removed: the previous checkpoint
    stays the latest.  (Asynchronous saves: ``training/saver.py``.)
    """
    pending = start_save(root, chunks, optimizer, scheduler, state, identity, watch)
    return commit_save(pending, before_commit)


def prune(root: str | os.PathLike, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` committed checkpoints under ``root`` (rank 0,
    after a commit); ``keep`` (the checkpoint a run resumed from) and the one ``latest.txt``
    names are never deleted.  Returns what was deleted."""
    ordered = sorted((p for p in Path(root).glob("step_*") if _is_checkpoint(p)), reverse=True)
    protected = set(ordered[:keep_last]) | {latest_checkpoint(root)}
    if keep is not None:
        protected.add(Path(keep))
    doomed = [p for p in ordered if p not in protected]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _disk_full(root: Path, latest: Path | None) -> str | None:
    """``No space left on device (...)`` when the disk under ``root`` cannot hold another
    checkpoint the size of ``latest``.  A full disk rarely says so itself: torch.save into a
    full file system fails with "[enforce fail at inline_container.cc] unexpected pos 704 vs
    598", and DCP reports only which ranks failed."""
    try:
        free = shutil.disk_usage(root).free
        need = sum(p.stat().st_size for p in latest.iterdir()) if latest else 1 << 20
    except OSError:
        return None
    if free >= need:
        return None
    return (f"OSError: [Errno 28] No space left on device: {free / 2**20:.0f} MiB free, the "
            f"last checkpoint took {need / 2**20:.0f} MiB")


def _first_line(err: BaseException) -> str:
    """A one-line description of ``err``.  DCP wraps each rank's failure in a long report
    (``CheckpointException``, whose details only the coordinator rank holds) and megatron
    wraps a writer's in "Worker failure: ..."; the innermost message is the useful one."""
    import errno

    text = str(err)
    for code, name in ((errno.ENOSPC, "No space left on device"),
                       (errno.EDQUOT, "Disk quota exceeded")):
        if name in text:
            return f"OSError: [Errno {code}] {name}"
    failures = getattr(err, "failures", None)  # DCP: {rank: (exception, traceback)}
    if failures:
        inner = sorted(failures.items())[0][1]
        err = inner[0] if isinstance(inner, tuple) else inner
        while err.__cause__ is not None:
            err = err.__cause__
        text = str(err)
    line = (text.strip().splitlines() or [""])[0].removeprefix("Worker failure: ")
    return f"{type(err).__name__}: {line[:300]}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and path.suffix != ".tmp" and (path / MARKER).is_file()


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None.  ``latest.txt`` names it; when
    it is missing, empty or names no checkpoint, the newest ``step_N`` that is one."""
    root = Path(root)
    pointer = root / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    if name and _is_checkpoint(root / name):
        return root / name
    complete = sorted(p for p in root.glob("step_*") if _is_checkpoint(p))
    return complete[-1] if complete else None


def resolve_load(path: str | os.PathLike) -> Path:
    """``checkpoint.load`` as a checkpoint directory: a ``step_N`` folder, or a folder of them
    (a run's ``checkpoints/``: its latest, as Megatron-LM's ``--load`` reads a save folder).
    Anything else is a ConfigError, raised before any process group starts."""
    from plt_train.config import ConfigError

    p = Path(path).expanduser()
    fix = "give a step_N checkpoint folder or a run's checkpoints folder"
    if not p.exists():
        raise ConfigError("checkpoint.load", f"{p} does not exist", fix)
    if _is_checkpoint(p):
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise ConfigError("checkpoint.load", f"{p} is neither a checkpoint (no {MARKER}) nor "
                          "a folder holding one", fix)
    return latest


def checkpoint_dir(cfg, run_dir: str | os.PathLike) -> Path:
    """Where a run saves: ``checkpoint.dir``, else ``<run_dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"))


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The committed checkpoints under ``root``, the one ``latest.txt`` names first, then the
    others newest first: the order a resuming run tries them in."""
    root = Path(root)
    found = sorted((p for p in root.glob("step_*") if _is_checkpoint(p)), reverse=True)
    first = latest_checkpoint(root)
    return ([first] if first else []) + [p for p in found if p != first]


def resume_candidates(checkpoint, ckpt_dir: str | os.PathLike) -> list[Path]:
    """Where a run may start from, in order: its own checkpoints in ``ckpt_dir`` (newest first)
    when ``checkpoint.resume`` is on and there are any, else ``checkpoint.load`` (or nothing).

    The run's own saves win over ``load`` so that a preempted job requeued with the same
    arguments (Slurm's ``--requeue`` reruns the same command line) continues where it
    stopped instead of going back to its starting checkpoint every time; torchtitan treats
    its ``initial_load_path`` the same way.
    """
    own = complete_checkpoints(ckpt_dir) if checkpoint.resume else []
    return own or ([resolve_load(checkpoint.load)] if checkpoint.load else [])


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that fails verification (its message names the file)."""


def load_verified(path: Path, chunks, optimizer, scheduler, identity: dict | None,
                  device: torch.device) -> TrainState:
    """Verify ``path`` (checksums), check that it belongs to this run (``identity``), load it
    and check that the weights are finite.  Raises ``DamagedCheckpoint`` or, for another
    model or tokenizer, ``ConfigError`` (one line each)."""
    from megatron.core import dist_checkpointing

    from plt_train.config import ConfigError
    from plt_train.training.guard import weights_are_finite
    from plt_train.training.integrity import damage, identity_mismatch

    problem = damage(path)
    if problem:
        raise DamagedCheckpoint(f"{path} is damaged: {problem}")
    saved = dist_checkpointing.load_common_state_dict(str(path))["train_state"]
    mismatch = identity_mismatch(saved.get("identity"), identity or {})
    if mismatch:
        raise ConfigError("checkpoint", f"{path} was saved by another model or tokenizer "
                          f"({mismatch})", "resume it with the settings it was trained with, "
                          "or give this run another name or checkpoint.dir")
    state = load_checkpoint(path, chunks, optimizer, scheduler)
    if not weights_are_finite(chunks, device):
        raise DamagedCheckpoint(f"{path} holds non-finite weights")
    return state


def resume(checkpoint, ckpt_dir: str | os.PathLike, chunks, optimizer, scheduler,
           identity: dict | None, device: torch.device) -> tuple[TrainState, Path | None]:
    """Load the newest usable checkpoint of ``resume_candidates``: a damaged one is skipped
    with a one-line warning naming the damaged file; when none of the run's own is usable, or
    ``checkpoint.load`` is damaged, ``CheckpointError``.  (TrainState(), None): nothing to
    resume."""
    from plt_train.runtime import is_logging_rank
    from plt_train.training.integrity import CheckpointError

    candidates = resume_candidates(checkpoint, ckpt_dir)
    for i, path in enumerate(candidates):
        try:
            return load_verified(path, chunks, optimizer, scheduler, identity, device), path
        except DamagedCheckpoint as err:
            if i + 1 == len(candidates):
                raise CheckpointError(f"{err}, and there is no older checkpoint to fall back "
                                      "to") from None
            if is_logging_rank():
                say(f"[plt_train] warning: {err}; falling back to {candidates[i + 1].name}",
                    sys.stderr)
    return TrainState(), None


SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def schedule_changes(scheduler, saved: dict) -> list[str]:
    """``"key: config X vs checkpoint Y"`` for each lr-schedule value changed since the
    checkpoint.  Megatron applies one side silently (it logs at INFO), so a run extended by
    raising ``train.steps`` would otherwise sit at ``min_lr`` without a word."""
    now = scheduler.state_dict()
    return [f"{k}: config {now[k]} vs checkpoint {saved[k]}" for k in SCHEDULE_KEYS
            if k in saved and now[k] != saved[k]]


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Without apex/TE, megatron-core 0.16.1's DistributedOptimizer reads Adam's ``step`` from
    the inner torch optimizer's state, which is empty until the first step (``state_dict``
    asserts).  Allocate it the way megatron does for FSDP: one zero-gradient step, taken
    before any checkpoint values are loaded in place (the scheduler's lr is 0 then)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer, loaded_optimizer_state: dict) -> None:
    """Repair torch Adam's per-parameter ``step`` after a DistributedOptimizer load.

    Without apex/TE (CPU, and GPUs without TE), megatron-core 0.16.1 keeps Adam's step count in
    the saved ``param_groups`` but (a) gives every parameter the SAME step tensor, which torch
    then increments once per parameter per step, and (b) copies the not-persisted step of the
    freshly allocated state back over it when loading ``dp_reshardable`` shards.  Either way the
    bias correction is wrong after a resume (docs/design/megatron-on-cpu.md, "Checkpoints").  Set
    each parameter's own step from the saved value.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded_optimizer_state] if len(opts) == 1 else list(loaded_optimizer_state.values())
    for opt, saved in zip(opts, states):
        if not isinstance(opt, DistributedOptimizer):
            continue
        groups = saved.get("optimizer", {}).get("param_groups", [])
        steps = {g["step"] for g in groups if "step" in g}
        if len(steps) != 1:
            continue  # apex/TE optimizers keep the step in the param groups themselves
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def load_model_weights(path: str | os.PathLike, chunks) -> None:
    """Only the model's weights (inference), into any parallel layout, after verifying the
    checkpoint's checksums (``CheckpointError`` when damaged)."""
    from megatron.core import dist_checkpointing

    from plt_train.training.integrity import CheckpointError, damage

    problem = damage(path)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}")
    model = _unwrap(chunks[0])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])


def load_checkpoint(path: str | os.PathLike, chunks, optimizer, scheduler) -> TrainState:
    from megatron.core import dist_checkpointing

    from plt_train.runtime import is_logging_rank

    path = str(path)
    common = dist_checkpointing.load_common_state_dict(path)
    saved_world = common["train_state"]["world_size"]
    _allocate_distributed_optimizer_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, scheduler, TrainState(), loading=True)
    if saved_world != dist.get_world_size():
        sharded.pop("rng")  # another layout: keep this run's fresh RNG streams
    loaded = dist_checkpointing.load(sharded, path)
    _unwrap(chunks[0]).load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 DistributedOptimizer: main params are views of leaf params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    changed = schedule_changes(scheduler, loaded["scheduler"])
    if changed and is_logging_rank():
        winner = "the config's" if scheduler.override_opt_param_scheduler else \
            "the checkpoint's (optim.override_schedule_on_resume=true takes the config's)"
        say(f"[plt_train] resume: the lr schedule differs from the checkpoint's "
            f"({'; '.join(changed)}); using {winner}", sys.stderr)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    ts = loaded["train_state"]
    return TrainState(step=ts["step"], consumed_samples=ts["consumed_samples"])
