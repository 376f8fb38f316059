"""The divergence guard's bookkeeping and finiteness checks (the real runs are in
tests/distributed/test_divergence.py)."""
from __future__ import annotations

import math

import pytest
import torch

from plt_train.training.guard import DivergenceGuard, TrainingDiverged


def test_consecutive_skips_stop_the_run_and_name_the_checkpoint():
    guard = DivergenceGuard(max_skipped_steps=2)
    assert guard.check(1, 5.0, 1.0, False) == []
    assert "step 2 skipped: non-finite loss (nan)" in guard.check(2, math.nan, None, True)[0]
    assert guard.check(3, 4.9, 1.0, False) == [] and not guard.diverged  # a good step resets
    guard.check(4, 5.0, math.inf, True)
    msg = guard.check(5, 5.0, math.nan, True)[0]
    assert "non-finite gradient (norm nan)" in msg and "2 in a row, 3 in all" in msg
    assert not guard.diverged
    guard.check(6, math.nan, None, True)
    assert guard.diverged
    err = guard.error(6, "/ckpt/step_4")
    assert isinstance(err, TrainingDiverged) and "\n" not in str(err)
    assert "3 steps in a row up to step 6" in str(err)
    assert "the last good checkpoint is /ckpt/step_4" in str(err)


def test_zero_allowed_skips_stops_at_the_first():
    guard = DivergenceGuard(max_skipped_steps=0)
    guard.check(1, math.nan, None, True)
    assert guard.diverged and "no checkpoint was written" in str(guard.error(1, None))


def test_loss_spike_is_reported_not_skipped():
    guard = DivergenceGuard(max_skipped_steps=3, spike_window=20, spike_zscore=6.0)
    for step in range(20):
        assert guard.check(step, 5.0 + 0.01 * (step % 3), 1.0, False) == []
    assert guard.check(20, 5.05, 1.0, False) == []  # 5 sd: below the threshold
    msg = guard.check(21, 6.0, 1.0, False)
    assert len(msg) == 1 and msg[0].startswith("loss spike at step 21: 6.0000 is")
    off = DivergenceGuard(max_skipped_steps=3, spike_window=20, spike_zscore=0.0)
    for step in range(20):
        off.check(step, 5.0 + 0.01 * (step % 3), 1.0, False)
    assert off.check(20, 60.0, 1.0, False) == []


def test_finite_checks_on_a_plain_module():
    """Outside megatron DDP (no gradient buffers) the checks read the parameters' .grad."""
    from plt_train.training.guard import grads_are_finite, weights_are_finite

    cpu = torch.device("cpu")
    layer = torch.nn.Linear(3, 3)
    layer.weight.grad, layer.bias.grad = torch.ones(3, 3), torch.ones(3)
    assert grads_are_finite([layer], cpu) and weights_are_finite([layer], cpu)
    layer.bias.grad[0] = math.inf
    assert not grads_are_finite([layer], cpu)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    assert not weights_are_finite([layer], cpu)
