"""Which checkpoint a run starts from: its own latest save beats ``checkpoint.load``, so a
requeued job continues instead of restarting from its starting point (the end-to-end resume
tests are in tests/distributed/test_resume.py and test_moe_train.py)."""
from __future__ import annotations

import pytest

from plt_train.config.schema import CheckpointConfig
from plt_train.training.checkpoint import resume_source


def _commit(root, step: int):
    (root / f"step_{step:07d}").mkdir(parents=True)
    (root / "latest.txt").write_text(f"step_{step:07d}")


def test_own_latest_checkpoint_beats_load(tmp_path):
    base, own = tmp_path / "base" / "step_0001000", tmp_path / "run" / "checkpoints"
    base.mkdir(parents=True)
    cfg = CheckpointConfig(load=str(base))
    # First start: nothing saved yet, so the run starts from `load`.
    assert str(resume_source(cfg, own)) == str(base)
    # After saves (then a preemption and a requeue with the same arguments): its own latest.
    _commit(own, 1500)
    _commit(own, 3200)
    assert resume_source(cfg, own) == own / "step_0003200"
    # An interrupted save (.tmp) is never a source.
    (own / "step_0003300.tmp").mkdir()
    assert resume_source(cfg, own) == own / "step_0003200"


def test_resume_off_uses_load_or_nothing(tmp_path):
    own = tmp_path / "checkpoints"
    _commit(own, 10)
    assert resume_source(CheckpointConfig(resume=False), own) is None
    assert resume_source(CheckpointConfig(resume=False, load="/x/step_1"), own) == "/x/step_1"
    assert resume_source(CheckpointConfig(), own) == own / "step_0000010"
    assert resume_source(CheckpointConfig(), tmp_path / "missing") is None


@pytest.mark.parametrize("override", [False, True])
def test_changed_lr_schedule_on_resume_is_named_and_one_side_wins(override):
    """Extending a run (train.steps 100 -> 200): megatron keeps the checkpoint's decay steps
    unless optim.override_schedule_on_resume, and either way the change is named."""
    import torch

    from plt_train.config.schema import OptimConfig
    from plt_train.training.checkpoint import schedule_changes
    from plt_train.training.optim import build_scheduler

    def scheduler(steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        return build_scheduler(opt, OptimConfig(override_schedule_on_resume=override), steps)

    saved = scheduler(100).state_dict()
    resumed = scheduler(200)
    assert schedule_changes(resumed, saved) == [
        "lr_decay_steps: config 200 vs checkpoint 100"]
    assert schedule_changes(scheduler(100), saved) == []
    resumed.load_state_dict(saved)
    assert resumed.lr_decay_steps == (200 if override else 100)
