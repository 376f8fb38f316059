"""The README's promise, with the README's command: running ``launch/torchrun.sh`` (what
``make train`` runs) again after a crash or a Ctrl-C continues the run from its latest
checkpoint, and once the run is finished says there is nothing to do (issue 21, part 4)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import DEBUG_ARGS, REPO, losses_by_step, read_metrics, run_process_group

COMMAND = ["bash", str(REPO / "launch" / "torchrun.sh"), *DEBUG_ARGS, "name=rerun",
           "train.steps=60", "checkpoint.save_interval=2"]


def _env():
    return {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _rows(run) -> list[dict]:
    try:
        return read_metrics(run, kind=None)
    except (OSError, ValueError):  # not there yet, or a line being written
        return []


def _interrupt(cwd, run, sig, after_step: int):
    """Start the command, send ``sig`` to its process group (as a terminal's Ctrl-C does:
    torchrun, which forwards it to its workers) once this launch has logged ``after_step``."""
    before = len(_rows(run))  # metrics.jsonl is appended to by every launch of the run

    def logged() -> int:
        return max((r["step"] for r in _rows(run)[before:] if r["kind"] == "train"), default=0)

    with open(cwd / f"log_{sig.name}.txt", "w") as log:
        proc = subprocess.Popen(COMMAND, cwd=cwd, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while logged() < after_step and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=240)
    return (cwd / f"log_{sig.name}.txt").read_text()


def test_rerunning_the_readme_command_resumes(tmp_path, data_cache):
    run = tmp_path / "outputs" / "rerun"  # derived from name=rerun, the same every launch
    ckpt = run / "checkpoints"
    # 1. A crash (rank 0 killed after step 5; torchrun then stops the other rank): the re-run
    # starts from the last periodic save.  (SIGKILL to torchrun alone would not do: its
    # workers run in their own sessions and outlive it, as they would a node's launcher.)
    crashed = run_process_group(COMMAND, {**_env(), "PLT_TRAIN_FAULT": "KILL@5"}, 300,
                                cwd=tmp_path)
    assert crashed.returncode != 0
    saved = int((ckpt / "latest.txt").read_text().strip().split("_")[1])
    assert saved == 4
    # 2. Ctrl-C during the re-run: every rank checkpoints the step it is in, then exits.
    text = _interrupt(tmp_path, run, signal.SIGINT, after_step=saved + 3)
    first_logged = [r["step"] for r in read_metrics(run)]
    assert f"start step={saved}" in text
    stopped = int((ckpt / "latest.txt").read_text().strip().split("_")[1])
    assert f"signal received: checkpointed step {stopped}" in text
    assert stopped >= saved + 3
    # 3. The same command again finishes the run from there.
    done = run_process_group(COMMAND, _env(), 300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"start step={stopped}" in done.stdout
    assert max(losses_by_step(run)) == 60 and len(first_logged) < len(read_metrics(run))
    # 4. And once more: nothing to do, said in one line, exit 0.
    again = run_process_group(COMMAND, _env(), 300, cwd=tmp_path)
    assert again.returncode == 0
    assert "is at step 60, train.steps=60: nothing to train" in again.stdout
