"""Checkpoints resume exactly, and a crash or kill never corrupts the latest one.

All on CPU with 2 processes (data parallel), so the sharded save/load paths really run.
With dropout on, so "exactly" includes the RNG streams: nothing between restoring them and
the first resumed step may draw from them (a data loader's seed, a timing matmul's inputs).
"""
from __future__ import annotations

import signal

import pytest

from tests.helpers import DEBUG_ARGS, losses_by_step, read_metrics, run_train

STEPS = 8
ARGS = DEBUG_ARGS + [f"train.steps={STEPS}", "train.global_batch_size=4",
                     "train.micro_batch_size=2", "optim.warmup_steps=2",
                     "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


def _uninterrupted(tmp_path, extra=()):
    ref_dir = tmp_path / "ref"
    run_train(ref_dir, ARGS + list(extra), nproc=2)
    ref = losses_by_step(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.mark.parametrize("optimizer", [[], ["parallel.use_distributed_optimizer=true"]],
                         ids=["plain_optimizer", "distributed_optimizer"])
def test_killed_run_resumes_bit_exact(tmp_path, data_cache, optimizer):
    ref = _uninterrupted(tmp_path, optimizer)
    run_dir, ckpt = tmp_path / "killed", tmp_path / "ckpt"
    args = ARGS + optimizer + ["checkpoint.save_interval=3", f"checkpoint.dir={ckpt}"]
    # SIGKILL after step 5: the last checkpoint is step 3, steps 4-5 are lost work.
    crashed = run_train(run_dir, args, nproc=2, env={"PLT_TRAIN_FAULT": "KILL@5"}, check=False)
    assert crashed.returncode != 0
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000003"
    assert max(r["step"] for r in read_metrics(run_dir)) == 5

    run_train(run_dir, args, nproc=2)
    resumed = losses_by_step(run_dir)  # steps 4, 5 re-logged by the resumed run
    assert resumed == ref, "resumed run must reproduce the uninterrupted losses bit for bit"
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000006"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, data_cache):
    # The reference run also saves step 2, for checkpoint.load below (saving changes nothing).
    ref_ckpt = tmp_path / "ref_ckpt"
    ref = _uninterrupted(tmp_path, [f"checkpoint.dir={ref_ckpt}", "checkpoint.save_interval=2"])
    run_dir, ckpt = tmp_path / "preempted", tmp_path / "ckpt"
    args = ARGS + [f"checkpoint.dir={ckpt}"]  # no periodic saves: only the signal saves
    # Only rank 0 receives SIGTERM; rank 1 must learn of it and save the same step.
    proc = run_train(run_dir, args, nproc=2, env={"PLT_TRAIN_FAULT": "TERM@4"})
    assert "signal received: checkpointed step 4" in proc.stdout + proc.stderr
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000004"
    assert max(r["step"] for r in read_metrics(run_dir)) == 4

    # Requeued with checkpoint.load added: the run's own step 4 wins over the older step 2
    # (Slurm reruns the same arguments, so `load` must only start a run that has none).
    run_train(run_dir, args + [f"checkpoint.load={ref_ckpt / 'step_0000002'}"], nproc=2)
    assert [r["step"] for r in read_metrics(run_dir)][4] == 5, "must resume from its step 4"
    assert losses_by_step(run_dir) == ref


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, data_cache):
    """A save that dies after writing shards but before committing is never loaded."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ARGS + ["checkpoint.save_interval=3", f"checkpoint.dir={ckpt}"]
    crashed = run_train(run_dir, args, nproc=2, check=False,
                        env={"PLT_TRAIN_FAULT": "KILL@6", "PLT_TRAIN_FAULT_IN_SAVE": "1"})
    assert crashed.returncode != 0
    assert (ckpt / "step_0000006.tmp").is_dir(), "the interrupted save left its partial files"
    assert not (ckpt / "step_0000006").exists()
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000003"

    run_train(run_dir, args, nproc=2)
    rows = [r for r in read_metrics(run_dir)]
    restarted_at = [r["step"] for r in rows][6]  # first step logged by the second run
    assert restarted_at == 4, "must resume from step 3, the last committed checkpoint"
    assert not (ckpt / "step_0000006.tmp").exists(), "stale partial save is cleaned up"
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000006"  # no save at end


def test_signals_are_the_slurm_ones_and_ctrl_c():
    from plt_train.training.signals import STOP_SIGNALS
    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
