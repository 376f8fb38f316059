"""Divergence guard: a step whose loss or gradients are not finite makes no update, a run that
keeps diverging stops with a one-line error, and a loss spike is reported.

What we took from whom:

* Megatron-LM (``--check-for-nan-in-loss-and-grad``, on by default) stops the run at the first
  NaN; its optimizer reports a skipped step only for fp16 loss-scale overflows, and a skipped
  step does not advance the learning-rate schedule.  We keep the schedule rule (the scheduler
  only steps after an update) and the "stop" outcome, but only after ``train.max_skipped_steps``
  consecutive skips: one bad batch (a NaN from an overflow, a corrupt sample) costs one step
  instead of the run.
* OLMo-core's ``SkipStepOptimizer`` skips a step whose loss or gradient norm is non-finite, and
  flags a loss more than ``sigma_factor`` standard deviations above the mean of a rolling
  window.  We flag spikes the same way (``train.spike_zscore`` over ``train.spike_window``
  steps) but only log them: a spike of a finite loss still updates, as in Megatron-LM.

The check is exact, not a heuristic: every rank looks at its own gradient buffers (megatron
DDP's ``grad_data``, before the optimizer touches them) and the ranks agree through one
all-reduce, so every rank skips the same steps and the weights stay identical across data
parallel ranks.  A checkpoint is only written from finite weights (``weights_are_finite``).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """The run stopped because it kept producing non-finite losses or gradients (or its
    weights became non-finite).  The message is one line, meant for the user."""


def _any_rank(bad: torch.Tensor) -> bool:
    """True on every rank when the 0-d flag ``bad`` is set on any rank (one all-reduce, one
    host sync)."""
    flag = bad.to(torch.float32).reshape(1)
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and not flag.is_cuda:
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _grad_buffers(chunk):
    """The gradient buffers of a megatron-core DDP chunk (dense and expert-parallel); [] for a
    plain module (whose ``buffers`` is the nn.Module method)."""
    dense, expert = getattr(chunk, "buffers", None), getattr(chunk, "expert_parallel_buffers", [])
    if not isinstance(dense, list):
        return []
    return [b.grad_data for b in dense + list(expert)]


def _all_finite(tensors, device: torch.device) -> torch.Tensor:
    finite = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(finite).all() if finite else torch.ones((), dtype=torch.bool,
                                                               device=device)


def grads_are_finite(chunks, device: torch.device) -> bool:
    """Whether every rank's reduced gradients are finite (one pass over the buffers, one
    all-reduce of a flag)."""
    grads = []
    for chunk in chunks:
        grads += _grad_buffers(chunk) or [p.grad for p in chunk.parameters()
                                          if p.grad is not None]
    return not _any_rank(~_all_finite(grads, device))


def weights_are_finite(chunks, device: torch.device) -> bool:
    """Whether every rank's parameters are finite."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    return not _any_rank(~_all_finite(params, device))


@dataclass
class DivergenceGuard:
    """Counts skipped steps and watches the loss: ``check`` after every step; once
    ``diverged``, raise ``error(...)`` (after the step was logged)."""

    max_skipped_steps: int
    spike_window: int = 100
    spike_zscore: float = 6.0
    skipped_total: int = 0
    consecutive: int = 0
    _recent: deque = field(default_factory=deque, repr=False)

    def check(self, step: int, loss: float, grad_norm, skipped: bool) -> list[str]:
        """Count this step; the messages to log for it."""
        if skipped:
            self.skipped_total += 1
            self.consecutive += 1
            return [f"step {step} skipped: non-finite {self._what(loss, grad_norm)} (no update; "
                    f"{self.consecutive} in a row, {self.skipped_total} in all)"]
        self.consecutive = 0
        messages = []
        if self.spike_zscore > 0 and len(self._recent) >= max(2, self.spike_window // 2):
            mean = sum(self._recent) / len(self._recent)
            sd = math.sqrt(sum((x - mean) ** 2 for x in self._recent) / (len(self._recent) - 1))
            if sd > 0 and (loss - mean) / sd > self.spike_zscore:
                messages.append(f"loss spike at step {step}: {loss:.4f} is "
                                f"{(loss - mean) / sd:.1f} sd above the mean {mean:.4f} of the "
                                f"last {len(self._recent)} steps")
        self._recent.append(loss)
        if len(self._recent) > self.spike_window:
            self._recent.popleft()
        return messages

    @property
    def diverged(self) -> bool:
        """More than ``max_skipped_steps`` steps in a row were skipped: stop the run."""
        return self.consecutive > self.max_skipped_steps

    def error(self, step: int, last_checkpoint) -> TrainingDiverged:
        """The one-line error that stops a diverged run."""
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                 else "no checkpoint was written")
        return TrainingDiverged(
            f"training diverged: {self.consecutive} steps in a row up to step {step} had a "
            f"non-finite loss or gradient ({where}); lower optim.lr, set optim.clip_grad, or "
            f"raise train.max_skipped_steps")

    @staticmethod
    def _what(loss: float, grad_norm) -> str:
        if not math.isfinite(loss):
            return f"loss ({loss})"
        return f"gradient (norm {grad_norm})" if grad_norm is not None else "gradient"
