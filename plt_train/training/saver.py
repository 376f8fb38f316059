"""A run's checkpoint saves, synchronous or in the background (``checkpoint.async_save``).

An asynchronous save follows Megatron-LM's ``--async-save``: megatron-core's
``dist_checkpointing.save(..., async_sharded_save=True)`` returns a request that an
``AsyncCallsQueue`` runs in a forked process (a fork is a consistent copy of the state at the
save's step on CPU; on GPUs megatron first copies the tensors to host memory), while the
training loop goes on.  ``poll`` (once per step, one all-reduce while a save is in flight)
finalizes it once every rank's writes are done, and then the save is committed exactly like a
synchronous one: checksums, rename, ``latest.txt`` (``checkpoint.commit_save``).  So a crash
while a background save is in flight leaves the previous checkpoint the latest, and a failed
background save is the same one-line ``CheckpointError`` as a failed synchronous save, raised
at the step that notices it.

At most one save is in flight: a new save, the end of training and a stop signal first wait
for it (``finish``).  Each commit logs the checkpoint's size and time and applies
``checkpoint.keep_last``.
"""
from __future__ import annotations

import time
from pathlib import Path

from plt_train.runtime.console import say
from plt_train.training.checkpoint import (
    PendingSave, TrainState, commit_save, finalize_async, prune, start_save,
)
from plt_train.training.checkpoint_writers import WriterWatch


class CheckpointSaver:
    def __init__(self, root: str | Path, checkpoint, identity: dict | None,
                 resumed_from: Path | None, verbose: bool):
        """``checkpoint``: the run's ``CheckpointConfig``; ``resumed_from`` is never pruned;
        ``verbose``: this rank prints the save lines (and prunes)."""
        self.root, self.cfg, self.identity = Path(root), checkpoint, identity
        self.resumed_from, self.verbose = resumed_from, verbose
        self.queue = None
        if checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()  # a forked process per save (not the persistent one)
        self.in_flight: PendingSave | None = None
        self._before_commit = None

    def save(self, chunks, optimizer, scheduler, state: TrainState,
             kill_first_writer: bool = False, before_commit=None) -> None:
        """Save ``state.step``: committed on return when synchronous, scheduled otherwise."""
        self.finish()
        watch = WriterWatch(self.cfg.save_timeout_s, kill_first_writer)
        pending = start_save(self.root, chunks, optimizer, scheduler,
                             TrainState(state.step, state.consumed_samples), self.identity,
                             watch, async_save=self.queue is not None)
        if self.queue is None:
            self._commit(pending, before_commit)
            return
        self.queue.schedule_async_request(pending.request)
        self.in_flight = pending
        if self.verbose:
            say(f"[plt_train] saving step_{state.step:07d} in the background (started in "
                f"{time.perf_counter() - pending.started:.1f} s)")
        self._before_commit = before_commit

    def poll(self) -> None:
        """Commit the save in flight if every rank has finished writing it (collective)."""
        if self.in_flight is not None:
            self._finalize(blocking=False)

    def finish(self) -> None:
        """Wait for the save in flight, and commit it (collective)."""
        if self.in_flight is not None:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        pending, self.in_flight = self.in_flight, None  # a failed save is not retried
        if finalize_async(self.queue, pending, blocking):
            self._commit(pending, self._before_commit)
        else:
            self.in_flight = pending

    def _commit(self, pending: PendingSave, before_commit) -> None:
        saved = commit_save(pending, before_commit)
        if not self.verbose:
            return
        pruned = prune(self.root, self.cfg.keep_last, self.resumed_from) \
            if self.cfg.keep_last else []
        size = sum(f.stat().st_size for f in saved.iterdir()) / 2**20
        gone = f"; deleted {', '.join(p.name for p in pruned)}" if pruned else ""
        say(f"[plt_train] saved {saved.name} ({size:,.1f} MiB) in "
            f"{time.perf_counter() - pending.started:.1f} s{gone}")
