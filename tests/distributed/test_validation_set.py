"""Validation is scored on the same batches whatever the run's length (equal-time comparisons
train for different numbers of steps and must be scored alike)."""
from __future__ import annotations

import pytest

from tests.helpers import DEBUG_ARGS, read_metrics, train_many

# A small validation split (one document of the embedded corpus): a request for more samples
# than it holds makes megatron repeat it over re-shuffled epochs, which is what used to happen
# when the request grew with train.steps (here 2 x 64 samples for 1 step, 11 x 64 for 10).
ARGS = DEBUG_ARGS + ["data.split='99.9,0.1,0'", "train.eval_interval=1", "train.eval_iters=4",
                     "train.global_batch_size=16", "train.micro_batch_size=4",
                     "optim.warmup_steps=0"]


def test_validation_batches_do_not_depend_on_train_steps(tmp_path, data_cache):
    short, long = tmp_path / "short", tmp_path / "long"
    train_many(tmp_path, {short: ARGS + ["train.steps=1"], long: ARGS + ["train.steps=10"]},
               nproc=1)
    # Same weights after step 1 (the first training batch is the same, and so is the lr of
    # step 1: no warm-up, and the decay starts from the peak), so the same validation
    # batches give the same loss.
    first = {r["step"]: r["loss"] for r in read_metrics(short, "valid")}
    second = {r["step"]: r["loss"] for r in read_metrics(long, "valid")}
    assert first[1] == pytest.approx(second[1], rel=1e-6, abs=1e-6)
