"""A Hydra sweep submitted to Slurm through hydra-submitit-launcher: each point of the sweep
is a Slurm job of 2 tasks (srun starts the ranks, no torchrun), and the launcher collects each
job's return value (the final metrics)."""
from __future__ import annotations

import pickle
import subprocess
import sys

from tests.helpers import DEBUG_ARGS, losses_by_step


def test_submitit_sweep_runs_jobs_and_collects_final_losses(cluster, tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "MASTER_ADDR": "127.0.0.1"}  # the test nodes' host names do not resolve
    proc = subprocess.run(
        [sys.executable, "-m", "plt_train.train", "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.timeout_min=10", *DEBUG_ARGS, "train.steps=3",
         "model.num_layers=2,4", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + cluster.logs()

    results = {}
    for path in sorted(sweep.glob(".submitit/*/*_0_result.pkl")):  # task 0 of each job
        status, job_return = pickle.loads(path.read_bytes())
        assert status == "success", job_return
        results[job_return.hydra_cfg.hydra.job.num] = job_return.return_value
    assert sorted(results) == [0, 1]
    for num, final in results.items():
        assert final["step"] == 3
        assert final["loss"] == losses_by_step(sweep / str(num))[3]  # what the job logged
    assert results[0]["loss"] != results[1]["loss"]  # two different models
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert logs.count("world=2") == 2  # one line per job, from its logging rank


def test_srun_tasks_get_torch_rendezvous_variables():
    from plt_train.runtime.launch_env import set_torch_env_from_slurm
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "123", "MASTER_ADDR": "10.0.0.1"}
    assert set_torch_env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == (
        "3", "4", "1", "20123")
    assert not set_torch_env_from_slurm({"SLURM_PROCID": "0"})  # a batch script, not a step
    torchrun = {"WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0",
                "TORCHELASTIC_RUN_ID": "x"}
    assert not set_torch_env_from_slurm(torchrun) and torchrun["WORLD_SIZE"] == "8"
    stale = {"WORLD_SIZE": "1", "MASTER_PORT": "5555", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "MASTER_ADDR": "h"}
    assert set_torch_env_from_slurm(stale)
    assert (stale["WORLD_SIZE"], stale["RANK"], stale["MASTER_PORT"]) == ("2", "1", "20007")
