"""Hydra multirun under torchrun: every job of a local sweep runs in the same two processes
(megatron's groups rebuilt per job with that job's sizes) and writes its own metrics."""
from __future__ import annotations

import os

import pytest

from tests.helpers import DEBUG_ARGS, TORCHRUN, losses_by_step, run_process_group


def test_local_sweep_over_depth_and_tensor_parallel(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    cmd = TORCHRUN + ["--standalone", "--nproc-per-node=2", "-m", "plt_train.train", "-m",
                      *DEBUG_ARGS, "train.steps=3", "model.num_layers=2,4",
                      "parallel.tensor=1,2", f"hydra.sweep.dir={sweep}"]
    proc = run_process_group(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Hydra numbers jobs in override order: (2, tp1), (2, tp2), (4, tp1), (4, tp2).
    finals = [losses_by_step(sweep / str(i))[3] for i in range(4)]
    assert finals[0] == pytest.approx(finals[1], rel=1e-5)  # TP=2 job == TP=1 job
    assert finals[2] == pytest.approx(finals[3], rel=1e-5)
    assert finals[0] != finals[2]  # the depth override really reached the model
    assert (sweep / "multirun.yaml").exists()
