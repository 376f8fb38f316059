"""Divergence is caught (issue 21, part 1): a non-finite step makes no update, a run that keeps
diverging stops with one line naming the step and the last good checkpoint, and no checkpoint
is ever written from non-finite weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import (
    DEBUG_ARGS, assert_clean_failure, checkpoint_tensors, read_metrics, run_train,
)

TWO_RANKS = DEBUG_ARGS + ["parallel=data", "train.global_batch_size=4",
                          "train.micro_batch_size=1", "optim.warmup_steps=4"]


# -- real runs: 2 ranks, data parallel --------------------------------------------------------
def test_one_nan_gradient_skips_one_step_on_every_rank(tmp_path, data_cache):
    """Rank 0's gradients of step 3 are NaN: every rank skips step 3 (no update, the lr
    schedule does not advance), then training goes on and ends normally."""
    run_train(tmp_path, TWO_RANKS + ["train.steps=5", "checkpoint.save_interval=1"], nproc=2,
              env={"PLT_TRAIN_FAULT": "NANGRAD@3"})
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    # JSONL writes non-finite values as strings; read_metrics turns them back into floats
    assert math.isnan(rows[3]["grad_norm"])
    assert all(math.isfinite(rows[s]["grad_norm"]) for s in (1, 2, 4, 5))
    assert rows[3]["lr"] == rows[2]["lr"] < rows[4]["lr"]  # warm-up paused for the skipped step
    assert rows[3]["skipped_steps"] == rows[5]["skipped_steps"] == 1
    assert "skipped_steps" not in rows[2]
    ckpt = tmp_path / "checkpoints"
    before, after = (checkpoint_tensors(ckpt / f"step_{s:07d}", tmp_path) for s in (2, 3))
    weights = [k for k in before if "optimizer" not in k and "rng" not in k
               and before[k].is_floating_point()]
    # Exact on any CPU or layout: a skipped step runs no arithmetic on the weights at all, so
    # step 3 saves the very bytes step 2 saved (serialisation is lossless).
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
    # And step 4 updates (AdamW at lr > 0 moves every weight by about lr): only "something
    # differs" is asserted, never a value.
    later = checkpoint_tensors(ckpt / f"step_{4:07d}", tmp_path)
    assert any(not torch.equal(after[k], later[k]) for k in weights)


def test_nan_weights_are_never_saved(tmp_path, data_cache):
    """A NaN weight on one rank from step 3 on: the step is skipped and the save of step 3 is
    refused with one line; the latest checkpoint stays step 2."""
    proc = run_train(tmp_path, TWO_RANKS + ["train.steps=6", "checkpoint.save_interval=1"],
                     nproc=2, env={"PLT_TRAIN_FAULT": "NANWEIGHT@3"}, check=False)
    assert_clean_failure(proc, "weights are not finite at step 3: not saved")
    line = [x for x in proc.stderr.splitlines() if x.startswith("plt-train:")]
    assert len(line) == 1 and line[0].endswith("step_0000002)")
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000001",
                                                                    "step_0000002"]


def test_runaway_learning_rate_stops_with_one_line(tmp_path, data_cache):
    """The issue's case: optim.lr=1e3 used to train to the end on NaN and save NaN
    checkpoints.  Now it stops with exit code 3 once more than train.max_skipped_steps steps
    in a row were non-finite, naming the last good checkpoint, which holds finite weights."""
    proc = run_train(tmp_path, TWO_RANKS + ["train.steps=40", "checkpoint.save_interval=2",
                                            "optim.lr=1e3", "optim.warmup_steps=0",
                                            "train.max_skipped_steps=2"],
                     nproc=2, check=False)
    assert_clean_failure(proc, "training diverged: 3 steps in a row")
    line = [x for x in proc.stderr.splitlines() if x.startswith("plt-train:")]
    assert len(line) == 1, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert rows[-1]["skipped_steps"] >= 3  # the stopping step is logged too
    ckpt = tmp_path / "checkpoints"
    latest = ckpt / (ckpt / "latest.txt").read_text().strip()
    assert f"the last good checkpoint is {latest}" in line[0]
    tensors = checkpoint_tensors(latest, tmp_path)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last, parse_constant=lambda c: pytest.fail(f"{c} in {last}"))  # strict JSON

