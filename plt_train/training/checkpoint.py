"""Checkpoints with ``megatron.core.dist_checkpointing``: resharding-friendly and atomic.

Layout of ``<dir>``::

    latest.txt            name of the newest complete checkpoint (replaced atomically)
    step_0000100/         a complete dist_checkpointing directory
    step_0000200.tmp/     a save in progress (or one that crashed): never loaded

A save writes into ``step_N.tmp``; only when every rank has finished does rank 0 rename it to
``step_N`` and then point ``latest.txt`` at it (write + ``os.replace``).  A crash or kill at any
moment therefore leaves the previous checkpoint as the latest loadable one.

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

LATEST = "latest.txt"
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


def _use_in_process_results_queue() -> None:
    """Saves here are synchronous, so the writer's results never cross a process boundary.

    megatron-core's ``filesystem_async._get_write_results_queue`` starts a *spawn* Manager
    process for them.  When a rank is SIGKILLed (OOM killer, node failure) that Manager
    survives as an orphan, holding the launcher's stdout open so the job never finishes.
    An in-process queue avoids the extra process altogether.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "_plt_train_local_queue", False):
        filesystem_async._get_write_results_queue = queue.Queue
        filesystem_async._plt_train_local_queue = True


def save_checkpoint(root: str | os.PathLike, chunks, optimizer, scheduler,
                    state: TrainState, before_commit=None) -> Path:
    """Save step ``state.step`` atomically; returns the final directory.

    ``before_commit`` is a test hook called after every rank wrote its shards and before the
    checkpoint becomes visible (so a test can simulate a crash at the worst moment).
    """
    from megatron.core import dist_checkpointing

    _use_in_process_results_queue()
    root = Path(root)
    final, tmp = _step_dir(root, state.step), Path(f"{_step_dir(root, state.step)}.tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, scheduler, state, loading=False),
                            str(tmp))
    dist.barrier()
    if before_commit is not None:
        before_commit(tmp)
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
    dist.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
    return complete[-1] if complete else None


def resume_source(checkpoint, ckpt_dir: str | os.PathLike) -> Path | str | None:
    """Where a run starts from: its own latest checkpoint in ``ckpt_dir`` when
    ``checkpoint.resume`` is on and one exists, else ``checkpoint.load`` (or nothing).

    The run's own saves win over ``load`` so that a preempted job requeued with the same
    arguments (Slurm's ``--requeue`` reruns the same command line) continues where it
    stopped instead of going back to its starting checkpoint every time; torchtitan treats
    its ``initial_load_path`` the same way.
    """
    own = latest_checkpoint(ckpt_dir) if checkpoint.resume else None
    return own or checkpoint.load or None


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
    """Only the model's weights (inference), into any parallel layout."""
    from megatron.core import dist_checkpointing

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
        print(f"[plt_train] resume: the lr schedule differs from the checkpoint's "
              f"({'; '.join(changed)}); using {winner}", file=sys.stderr, flush=True)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    ts = loaded["train_state"]
    return TrainState(step=ts["step"], consumed_samples=ts["consumed_samples"])
