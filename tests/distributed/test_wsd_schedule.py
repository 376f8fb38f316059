"""The warmup-stable-decay schedule (issue 20, part 4): a run stopped in its stable phase and
annealed later, to an end chosen then, follows exactly the run that knew its end from the
start (megatron keeps the checkpoint's schedule on resume by default, and does not even save
``wsd_decay_steps``: a WSD run takes the config's)."""
from __future__ import annotations

import pytest

from tests.helpers import DEBUG_ARGS, read_metrics, run_train

WSD = DEBUG_ARGS + ["optim.decay_style=wsd", "optim.warmup_steps=1", "optim.wsd_decay_steps=4",
                    "optim.lr=3e-3", "optim.min_lr=3e-4"]


def _by_step(run_dir):
    return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(run_dir)}


def test_annealing_a_stable_checkpoint_matches_the_planned_run(tmp_path, data_cache):
    planned = tmp_path / "planned"
    run_train(planned, WSD + ["train.steps=8"])
    reference = _by_step(planned)
    lrs = [reference[s][1] for s in range(1, 9)]
    assert lrs[1:4] == pytest.approx([3e-3] * 3, rel=1e-12)  # the peak after 1 warmup step
    assert lrs[3] > lrs[4] > lrs[5] > lrs[6] > lrs[7] == pytest.approx(3e-4)  # annealed

    # The same run planned for 100 steps, stopped after 4 (its stable phase), then annealed
    # from that checkpoint to end at step 8.
    late = tmp_path / "late"
    run_train(late, WSD + ["train.steps=4", "optim.decay_steps=100",
                           "checkpoint.save_at_end=true"])
    resumed = run_train(late, WSD + ["train.steps=8"])
    assert "start step=4" in resumed.stdout + resumed.stderr
    got = _by_step(late)
    for step in range(1, 9):
        assert got[step][1] == pytest.approx(reference[step][1], rel=1e-9), step
        assert got[step][0] == pytest.approx(reference[step][0], rel=1e-5), step
