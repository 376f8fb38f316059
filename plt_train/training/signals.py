"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends before a time limit or preemption) and SIGINT
(Ctrl-C) ask the run to checkpoint at the end of the current step and exit cleanly.  Ctrl-C
reaches every worker twice (from the terminal, and forwarded by torchrun), so it only sets the
flag like the others; SIGQUIT (Ctrl-\\) or SIGKILL still stop a run at once.

The handler only sets a flag; every rank then agrees through one all-reduce per step, so all
ranks save the same step even if the signal reached them at different moments.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    def __init__(self, signals=STOP_SIGNALS):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._on_signal) for s in signals}

    def _on_signal(self, signum, _frame):
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class FaultInjector:
    """Test hook for crash and preemption tests (never set in real runs).

    ``PLT_TRAIN_FAULT=KILL@5``: rank 0 sends itself SIGKILL after step 5 (a crash between
    checkpoints).  ``TERM@3`` / ``USR1@3``: a preemption signal to rank 0 only (the other ranks
    learn of it through ``should_stop``).  With ``PLT_TRAIN_FAULT_IN_SAVE=1`` the signal fires
    inside the save of that step instead, after the shards are written and before the commit.
    ``NANGRAD@3``: rank 0's gradients of step 3 become NaN (one bad step, the other ranks'
    are fine); ``NANWEIGHT@3``: rank 0's first parameter becomes NaN before step 3 (a broken
    model from then on).  Both exercise the divergence guard (``training/guard.py``).
    ``HANG@3``: rank 0 stops responding before step 3 (sleeps forever: the other ranks' next
    collective must time out); ``KILLWRITER@4``: the first checkpoint writer process of rank
    0's save of step 4 is SIGKILLed (what the OOM killer does).  Both exercise
    ``runtime/hangs.py`` and ``training/checkpoint_writers.py``.
    """

    def __init__(self, signum: int | None = None, step: int = 0, in_save: bool = False,
                 kind: str | None = None):
        self.signum, self.step, self.in_save, self.kind = signum, step, in_save, kind

    @classmethod
    def from_env(cls, env=None) -> "FaultInjector":
        import os
        env = os.environ if env is None else env
        spec = env.get("PLT_TRAIN_FAULT", "")
        if not spec:
            return cls()
        name, step = spec.split("@")
        if name.upper() in ("NANGRAD", "NANWEIGHT", "HANG", "KILLWRITER"):
            return cls(None, int(step), kind=name.upper())
        return cls(getattr(signal, f"SIG{name.upper()}"), int(step),
                   env.get("PLT_TRAIN_FAULT_IN_SAVE") == "1")

    def before_step(self, step: int, rank: int, chunks) -> None:
        """``step`` is the step about to run (1-based)."""
        if self.kind is None or step != self.step or rank != 0:
            return
        if self.kind == "HANG":
            import time
            while True:
                time.sleep(1)
        if self.kind == "KILLWRITER":
            return
        param = next(p for chunk in chunks for p in chunk.parameters())
        if self.kind == "NANWEIGHT":
            with torch.no_grad():
                param.fill_(float("nan"))
        else:  # poison this backward's gradient of it once
            handle = None

            def poison(grad):
                handle.remove()
                return torch.full_like(grad, float("nan"))
            handle = param.register_hook(poison)

    def kills_writer(self, step: int, rank: int) -> bool:
        return self.kind == "KILLWRITER" and step == self.step and rank == 0

    def _fire(self, step: int, rank: int) -> None:
        import os
        if self.signum is not None and step == self.step and rank == 0:
            os.kill(os.getpid(), self.signum)

    def after_step(self, step: int, rank: int) -> None:
        if not self.in_save:
            self._fire(step, rank)

    def before_commit(self, step: int, rank: int) -> None:
        if self.in_save:
            self._fire(step, rank)
