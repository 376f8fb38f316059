"""Which checkpoint a run starts from: its own latest save beats ``checkpoint.load``, so a
requeued job continues instead of restarting from its starting point (the end-to-end resume
tests are in tests/distributed/test_resume.py and test_moe_train.py)."""
from __future__ import annotations

import pytest

from plt_train.config.schema import CheckpointConfig
from plt_train.training.checkpoint import resume_candidates


def resume_source(cfg, ckpt_dir):
    """Where the run starts: the first candidate (None: from scratch)."""
    return next(iter(resume_candidates(cfg, ckpt_dir)), None)


def _commit(root, step: int):
    _fake_checkpoint(root / f"step_{step:07d}")
    (root / "latest.txt").write_text(f"step_{step:07d}")


def _fake_checkpoint(path):
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")  # what marks a megatron checkpoint folder


def test_own_latest_checkpoint_beats_load(tmp_path):
    base, own = tmp_path / "base" / "step_0001000", tmp_path / "run" / "checkpoints"
    _fake_checkpoint(base)
    cfg = CheckpointConfig(load=str(base))
    # First start: nothing saved yet, so the run starts from `load`.
    assert resume_source(cfg, own) == base
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
    other = tmp_path / "other" / "step_0000001"
    _fake_checkpoint(other)
    assert resume_source(CheckpointConfig(resume=False), own) is None
    assert resume_source(CheckpointConfig(resume=False, load=str(other)), own) == other
    assert resume_source(CheckpointConfig(), own) == own / "step_0000010"
    assert resume_source(CheckpointConfig(), tmp_path / "missing") is None


def test_load_accepts_a_checkpoints_folder_and_refuses_the_rest(tmp_path):
    """checkpoint.load may name a run's checkpoints folder (its latest is loaded, as
    Megatron-LM's --load); a missing path or a folder without a checkpoint is one line."""
    from plt_train.config import ConfigError
    from plt_train.training.checkpoint import resolve_load

    own = tmp_path / "run" / "checkpoints"
    _commit(own, 5)
    _commit(own, 7)
    assert resolve_load(own) == own / "step_0000007"
    assert resolve_load(own / "step_0000005") == own / "step_0000005"
    with pytest.raises(ConfigError, match="checkpoint.load: .*step_0000009 does not exist"):
        resolve_load(own / "step_0000009")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a checkpoint .* nor a folder holding one"):
        resolve_load(tmp_path / "empty")


def test_empty_pointer_or_step_folder_is_not_a_checkpoint(tmp_path):
    """An empty latest.txt, or an empty step_N folder, used to be 'loaded' and fail inside
    megatron with 'not a distributed checkpoint': the newest real checkpoint is used."""
    from plt_train.training.checkpoint import latest_checkpoint

    own = tmp_path / "checkpoints"
    _commit(own, 4)
    (own / "step_0000006").mkdir()  # empty: no metadata.json
    (own / "latest.txt").write_text("")
    assert latest_checkpoint(own) == own / "step_0000004"
    (own / "latest.txt").write_text("step_0000006\n")
    assert latest_checkpoint(own) == own / "step_0000004"
    (own / "step_0000004" / "metadata.json").unlink()
    assert latest_checkpoint(own) is None


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
