"""Overlapped parameter all-gather (issue 20, part 2): with the distributed optimizer at DP=2,
gathering the updated weights bucket by bucket inside the next forward pass gives the same
training and validation losses as the plain all-gather, and its checkpoints hold the gathered
weights (each rank owns only its shard between an optimizer step and the next forward: a save
that did not gather first would write other ranks' stale shards).  Validation runs at steps
3 and 4, so the save of step 2 follows the optimizer step with no forward pass between."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import (
    DEBUG_ARGS, checkpoint_tensors, losses_by_step, run_train, train_many,
)

ARGS = DEBUG_ARGS + ["parallel=data", "parallel.use_distributed_optimizer=true",
                     "train.global_batch_size=4", "train.micro_batch_size=1", "train.steps=4",
                     "checkpoint.save_interval=2", "train.eval_interval=3",
                     "train.eval_iters=1"]
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
           "parallel.bucket_size=20000"]


def test_overlapped_param_gather_matches_and_its_checkpoints_resume(tmp_path, data_cache):
    plain, overlap = tmp_path / "plain", tmp_path / "overlap"
    train_many(tmp_path, {plain: ARGS, overlap: ARGS + OVERLAP}, nproc=2)
    for kind in ("train", "valid"):
        ref, got = losses_by_step(plain, kind), losses_by_step(overlap, kind)
        assert sorted(got) == sorted(ref) and len(ref) >= 2, kind
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-6), (kind, step)
    # The step-2 checkpoints hold the same (gathered) weights.  (The optimizer's state is
    # stored per gradient bucket, and the buckets differ, so it is compared by the resume.)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = (checkpoint_tensors(run / "checkpoints" / "step_0000002", tmp_path / name)
            for run, name in ((plain, "a"), (overlap, "b")))
    weights = [k for k in a if k.startswith(("embedding.", "decoder.", "output_layer."))]
    assert len(weights) > 5 and all(k in b for k in weights)
    for key in weights:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    # And a resume from it reproduces steps 3-4.
    reference = losses_by_step(overlap, "train")
    shutil.rmtree(overlap / "checkpoints" / "step_0000004")
    run_train(overlap, ARGS + OVERLAP, nproc=2)
    resumed = losses_by_step(overlap, "train")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6), step
