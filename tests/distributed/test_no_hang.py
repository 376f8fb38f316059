"""No silent hang (issue 21, part 3): a stalled rank and a killed checkpoint writer each end the
job in bounded time, with one line naming what failed and files saying where each rank was."""
from __future__ import annotations

import pickle
import time

import pytest

from tests.helpers import DEBUG_ARGS, assert_clean_failure, losses_by_step, run_train

ARGS = DEBUG_ARGS + ["parallel=data", "train.global_batch_size=4"]


def _plt_lines(proc):
    return [x for x in proc.stderr.splitlines() if x.startswith("plt-train:")]


def test_a_stalled_rank_ends_the_job_and_says_where_each_rank_was(tmp_path, data_cache):
    """Rank 0 stops responding before step 2: rank 1's gradient all-reduce times out after
    parallel.timeout_s (it used to wait forever), it prints one line and dumps its flight
    recorder; torchrun then stops rank 0, whose stacks show where it was stuck."""
    start = time.monotonic()
    proc = run_train(tmp_path, ARGS + ["train.steps=4", "parallel.timeout_s=8"], nproc=2,
                     env={"PLT_TRAIN_FAULT": "HANG@2"}, check=False, timeout=240)
    elapsed = time.monotonic() - start
    assert elapsed < 150, elapsed  # start-up + 8 s + torchrun's 30 s before SIGKILL
    assert_clean_failure(proc)
    (line,) = _plt_lines(proc)
    assert line.startswith("plt-train: rank 1: a collective timed out after 8 s "
                           "(parallel.timeout_s) during step 2"), line
    assert str(tmp_path / "flight_recorder") in line
    stacks = (tmp_path / "stacks_rank0.log").read_text()
    assert 'signals.py", line' in stacks and "in before_step" in stacks  # the stuck call
    trace = pickle.loads((tmp_path / "flight_recorder" / "rank_1").read_bytes())
    last = trace["entries"][-1]
    assert last["profiling_name"] == "gloo:all_reduce"
    assert "finish_grad_sync" in [f["name"] for f in last["frames"]]
    assert not (tmp_path / "stacks_rank1.log").exists()  # rank 1 exited by itself


@pytest.mark.parametrize("async_save", [False, True])
def test_a_killed_checkpoint_writer_fails_the_save_in_one_line(tmp_path, data_cache,
                                                               async_save):
    """Killing a writer process megatron forks (an OOM kill) used to block rank 0 forever in
    ``count_queue.join()``; now the save fails at once, the previous checkpoint stays the
    latest, and the same command then resumes from it."""
    args = ARGS + ["train.steps=6", "checkpoint.save_interval=2",
                   f"checkpoint.async_save={str(async_save).lower()}"]
    proc = run_train(tmp_path, args, nproc=2, env={"PLT_TRAIN_FAULT": "KILLWRITER@4"},
                     check=False, timeout=180)
    assert_clean_failure(proc)
    (line,) = _plt_lines(proc)
    assert line.startswith(f"plt-train: saving step 4 to {tmp_path / 'checkpoints'} failed "
                           "(RuntimeError: checkpoint writer 0 of rank 0 (pid "), line
    assert "was killed by SIGKILL" in line and line.endswith("step_0000002 is still the latest")
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "step_0000002"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    if async_save:
        again = run_train(tmp_path, args, nproc=2)
        assert "start step=2" in again.stdout + again.stderr
        assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "step_0000006"
        assert set(losses_by_step(tmp_path)) == {1, 2, 3, 4, 5, 6}
