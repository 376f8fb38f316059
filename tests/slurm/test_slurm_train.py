"""The project's own sbatch script on a real (local, two-node) Slurm cluster.

A 2-node x 2-process job trains; a second one is preempted by SIGUSR1 (what ``--signal``
sends before a time limit), checkpoints, requeues itself, resumes from its checkpoint and
ends with the same loss curve as the uninterrupted job.
"""
from __future__ import annotations

import os
import time

from tests.helpers import DEBUG_ARGS, REPO, losses_by_step, read_metrics

STEPS = 12
ARGS = DEBUG_ARGS + [f"train.steps={STEPS}", "train.global_batch_size=8",
                     "train.micro_batch_size=2", "optim.warmup_steps=2"]
SCRIPT = str(REPO / "launch" / "slurm" / "train.sbatch")


def _submit(cluster, run_dir, tmp_path, name):
    env = {"PLT_TRAIN_RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "WANDB_SILENT": "true", "PLT_TRAIN_CACHE": os.environ["PLT_TRAIN_CACHE"]}
    return cluster.sbatch("--nodes=2", f"--output={tmp_path}/{name}-%j.out", f"--chdir={REPO}",
                          SCRIPT, *ARGS, env=env)


def _job_output(tmp_path, name) -> str:
    return "\n".join(p.read_text() for p in tmp_path.glob(f"{name}-*.out"))


def test_two_node_job_is_preempted_requeued_and_resumes_exactly(cluster, tmp_path, data_cache):
    ref_dir = tmp_path / "ref"
    job = _submit(cluster, ref_dir, tmp_path, "ref")
    cluster.wait_gone(job, timeout=300)
    ref = losses_by_step(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)), _job_output(tmp_path, "ref")
    assert "world=4" in _job_output(tmp_path, "ref")  # 2 nodes x 2 processes

    run_dir = tmp_path / "preempted"
    job = _submit(cluster, run_dir, tmp_path, "pre")
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, _job_output(tmp_path, "pre") + cluster.logs()
        time.sleep(0.5)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    cluster.wait_gone(job, timeout=400)

    out = _job_output(tmp_path, "pre")
    assert "requeueing job" in out and "restart 1" in out, out[-4000:]
    stopped_at = int(out.split("signal received: checkpointed step ")[1].split(",")[0])
    assert 3 <= stopped_at < STEPS
    assert losses_by_step(run_dir) == ref, out[-4000:]
