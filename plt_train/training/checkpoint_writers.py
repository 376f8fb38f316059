"""The processes that write a checkpoint's shards, watched.  The one place where plt_train
replaces part of megatron-core's checkpoint writer (0.16.1), and why:

* ``FileSystemWriterAsync.write_preloaded_data_multiproc`` forks one writer process per shard
  file and waits for them with ``count_queue.join()``, which has no timeout: a writer that is
  killed (the OOM killer, a node agent) leaves its rank blocked there forever, and every other
  rank with it at the next collective (issue 21: one orphaned rank was still blocked 29
  minutes later).  ``write_watched`` runs megatron's own writer function in the same forked
  processes, but the parent waits for their results with a deadline
  (``checkpoint.save_timeout_s``) and watches their exit codes: a writer that dies fails the
  save at once, one that is still writing at the deadline is killed and fails it, each with
  a message naming the writer, the rank, the file and the cause.  The failure then travels
  megatron's and DCP's normal error path (every rank raises), so ``save_checkpoint`` turns it
  into its one-line ``CheckpointError``.
* megatron hands the writers' results back through a queue of a *spawn* ``Manager`` process
  (``filesystem_async._get_write_results_queue``).  When a rank is SIGKILLed that Manager
  survives as an orphan holding the launcher's stdout open, so the job never finishes.
  ``ResultsFile`` carries the (small) results in a pickle file instead: no extra process, and
  it works both when the writers run under the training process (synchronous saves) and
  under the forked background process of an asynchronous save.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import tempfile
import time
from dataclasses import dataclass
from functools import partial


@dataclass(frozen=True)
class WriterWatch:
    """How the writers of one save are watched.  ``kill_first_writer`` is a test hook: the
    first writer SIGKILLs itself before writing (what an OOM kill does)."""
    timeout_s: float = 1200.0
    kill_first_writer: bool = False


class ResultsFile:
    """A one-item queue through a file (``put`` in any process forked after it was made,
    ``get_nowait`` in the maker): what megatron's writer needs from its results queue."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="plt_train_ckpt_results_")
        os.close(fd)
        os.unlink(self.path)

    def put(self, obj) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)
        os.replace(tmp, self.path)

    def get_nowait(self):
        try:
            with open(self.path, "rb") as f:
                obj = pickle.load(f)
        except FileNotFoundError:
            raise queue.Empty from None
        os.unlink(self.path)
        return obj


class _Done:
    """Stands in for megatron's per-writer ``count_queue`` (``get`` + ``task_done``)."""

    def get(self):
        return None

    def task_done(self):
        return None


def _write_one(transform_list, index: int, bucket, results, kill_self: bool) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    if kill_self:
        os.kill(os.getpid(), signal.SIGKILL)
    FileSystemWriterAsync.write_preloaded_data(transform_list, index, bucket, results, _Done(),
                                               use_fsync=True)


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def write_watched(watch: WriterWatch, transform_list, use_msc: bool, rank: int, write_buckets,
                  global_results_queue) -> None:
    """Drop-in for ``FileSystemWriterAsync.write_preloaded_data_multiproc``: the same writers
    and results, with each writer watched and a deadline.  Puts ``{writer index: results}``
    or an exception into ``global_results_queue``."""
    import multiprocessing as mp

    if use_msc:
        raise NotImplementedError("multi-storage-client checkpoints are not supported")
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    writers = [ctx.Process(target=_write_one, daemon=True,
                           args=(transform_list, i, bucket, results,
                                 watch.kill_first_writer and i == 0))
               for i, bucket in enumerate(write_buckets)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + watch.timeout_s
    got: dict = {}
    outcome: dict | Exception = got

    def describe(i: int) -> str:
        return (f"checkpoint writer {i} of rank {rank} (pid {writers[i].pid}) "
                f"writing {os.path.basename(write_buckets[i][0])}")

    while len(got) < len(writers):
        item = _next_result(results, 0.2)
        if item is None:
            dead = [i for i, w in enumerate(writers) if i not in got and w.exitcode is not None]
            if dead:  # results of a writer that finished just now may still be in flight
                item = _next_result(results, 0.5)
                if item is None:
                    i, code = dead[0], writers[dead[0]].exitcode
                    cause = (f"was killed by {_signal_name(code)} (the OOM killer does this)"
                             if code < 0 else f"exited with code {code} and no result")
                    outcome = RuntimeError(f"{describe(i)} {cause}")
                    break
            elif time.monotonic() > deadline:
                i = next(i for i in range(len(writers)) if i not in got)
                outcome = TimeoutError(f"{describe(i)} was still writing after "
                                       f"{watch.timeout_s:g} s (checkpoint.save_timeout_s)")
                break
            else:
                continue
        index, result = item
        if isinstance(result, Exception):
            outcome = result
            break
        got[index] = result
    for w in writers:
        if w.is_alive():
            w.kill()
        w.join(timeout=5)
    global_results_queue.put(outcome)


def _next_result(results, timeout: float):
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        return None


@contextlib.contextmanager
def watched_writers(watch: WriterWatch):
    """Within this block, checkpoint saves (and the asynchronous save requests they return)
    use ``write_watched`` and ``ResultsFile``."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    cls = filesystem_async.FileSystemWriterAsync
    saved = (cls.__dict__["write_preloaded_data_multiproc"],
             filesystem_async._get_write_results_queue)
    cls.write_preloaded_data_multiproc = staticmethod(partial(write_watched, watch))
    filesystem_async._get_write_results_queue = ResultsFile
    try:
        yield
    finally:
        cls.write_preloaded_data_multiproc, filesystem_async._get_write_results_queue = saved
