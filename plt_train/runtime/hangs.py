"""No silent hang: what makes a stuck rank end the job, and say where every rank was.

Three pieces, all set up by ``plt_train.train`` before or right after the process group starts:

* **Timeouts.**  ``parallel.timeout_s`` is the timeout of the default process group and of
  every megatron-core group, so a collective whose peer stalls or dies raises (gloo: "Timed out
  waiting ...ms"; NCCL: its watchdog) instead of waiting forever.  ``communication_failure``
  recognises those errors so the entry point can say it in one line.
* **Flight recorder.**  torch records each rank's recent collectives (NCCL and, since torch
  2.8, gloo) when ``TORCH_FR_BUFFER_SIZE`` is set.  ``flight_recorder_env`` turns it on and
  points NCCL's dump-on-timeout at ``<run_dir>/flight_recorder/rank_<R>``; gloo has no
  automatic dump, so ``dump_flight_recorder`` writes the same file when a collective fails
  here.  ``python -m torch.distributed.flight_recorder.fr_trace <dir> -p rank_`` then shows
  which rank is missing from which collective.
* **Stacks on a stop signal.**  When one worker fails, torchrun sends SIGTERM to the others,
  then SIGKILL.  A rank that is truly stuck (in a kernel, a dead file system, a Python
  deadlock) never reaches its Python signal handler, so ``StackDumpOnSignal`` registers
  ``faulthandler`` (a C-level handler that needs no GIL) on the stop signals: every rank
  still alive appends all its threads' stacks to ``<run_dir>/stacks_rank<R>.log``, then the
  preemption handler runs as before (``chain=True``).
"""
from __future__ import annotations

import faulthandler
import os
import pickle
from pathlib import Path

FLIGHT_RECORDER_DIR = "flight_recorder"
FLIGHT_RECORDER_ENTRIES = 2000  # collectives kept per rank (torch's suggested size)

_TIMEOUT_MARKS = ("Timed out waiting", "Watchdog caught collective operation timeout",
                  "timed out", "Timeout")
_LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "remote process exited", "NCCL communicator was aborted")


def flight_recorder_env(run_dir: str | os.PathLike, env=os.environ) -> dict:
    """Turn on the flight recorder and NCCL's dump on timeout (values already set win; read by
    torch when a process group is created, so call before ``init_process_group``).  Returns
    what it set.  Set here rather than in the launch scripts so every way of starting a run
    (torchrun, srun, a plain ``python``, Hydra's submitit) gets the same."""
    prefix = str(Path(run_dir) / FLIGHT_RECORDER_DIR / "rank_")
    wanted = {
        "TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),  # its older name
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # every rank dumps when one times out
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,  # its older name
        # Abort the communicator and raise on a failed or timed-out NCCL collective instead
        # of leaving the rank blocked in it (torch's default; set in case a site changed it).
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    }
    done = {k: v for k, v in wanted.items() if k not in env}
    env.update(done)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    return done


def dump_flight_recorder(run_dir: str | os.PathLike, rank: int) -> Path | None:
    """Write this rank's flight-recorder trace (the format NCCL dumps on timeout) to
    ``<run_dir>/flight_recorder/rank_<R>``; None when the recorder is off or unavailable."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace

        trace = _dump_fr_trace(True, True, False)
        if not pickle.loads(trace).get("entries"):
            return None
        path = Path(run_dir) / FLIGHT_RECORDER_DIR / f"rank_{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(trace)
        return path
    except Exception:  # diagnostics must never hide the error being reported
        return None


def communication_failure(err: BaseException) -> str | None:
    """``"timed out"`` or ``"lost a peer"`` when ``err`` is a failed collective, else None."""
    text = f"{type(err).__name__}: {err}"
    if not (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text
                                               or "DistBackendError" in text
                                               or "c10d" in text.lower())):
        return None
    if any(m in text for m in _LOST_PEER_MARKS):
        return "lost a peer"
    if any(m in text for m in _TIMEOUT_MARKS):
        return "timed out"
    return None


class StackDumpOnSignal:
    """Append every thread's Python stack to ``<run_dir>/stacks_rank<R>.log`` whenever one of
    ``signals`` arrives, then let the handler installed before (the preemption flag) run.
    Install after that handler; ``close`` before restoring it."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, signals):
        self.path = Path(run_dir) / f"stacks_rank{rank}.log"
        self.signals = tuple(signals)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # kept open: the C handler writes to its descriptor
        for s in self.signals:
            faulthandler.register(s, file=self._file, all_threads=True, chain=True)

    def close(self) -> None:
        for s in self.signals:
            faulthandler.unregister(s)
        self._file.close()
        try:
            if self.path.stat().st_size == 0:  # no signal came: leave no empty file behind
                self.path.unlink()
        except OSError:  # the run folder is gone (a test's tmp dir, a cleaned-up sweep)
            pass
