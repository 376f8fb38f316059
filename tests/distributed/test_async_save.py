"""Asynchronous checkpoint saves (issue 21, part 2): written in the background while training
goes on, committed later with the same checksums and atomic rename, and a resume from one
reproduces the run exactly."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import DEBUG_ARGS, losses_by_step, run_train

ARGS = DEBUG_ARGS + ["parallel=data", "parallel.use_distributed_optimizer=true",
                     "train.global_batch_size=4", "train.steps=4",
                     "checkpoint.save_interval=2", "checkpoint.async_save=true"]


def test_async_save_is_committed_later_and_resumes_exactly(tmp_path, data_cache):
    first = run_train(tmp_path, ARGS, nproc=2)
    lines = first.stdout.splitlines()

    def at(prefix):
        return next(i for i, x in enumerate(lines) if x.startswith(prefix))
    # Scheduled at step 2, committed only after step 3 ran (training did not wait for it).
    assert at("[plt_train] saving step_0000002 in the background") < at("step 3/4")
    assert at("step 3/4") < at("[plt_train] saved step_0000002")
    reference = losses_by_step(tmp_path)
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):  # committed like a synchronous save: manifest, marker, no .tmp left
        files = json.loads((ckpt / f"step_{step:07d}" / "checksums.json").read_text())["files"]
        assert "common.pt" in files and any(n.endswith(".distcp") for n in files)
        assert (ckpt / f"step_{step:07d}" / "metadata.json").is_file()
    assert not list(ckpt.glob("*.tmp"))

    # Resume from step 2: the background writer saved step 2's state (model, distributed
    # optimizer, schedule, data position), not the state of the steps that ran meanwhile.
    shutil.rmtree(ckpt / "step_0000004")
    run_train(tmp_path, ARGS, nproc=2)
    resumed = losses_by_step(tmp_path)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7)
