"""Checkpoints are verified and damaged ones are not trusted (issue 21, part 2): checksums with
a fall-back to the previous checkpoint, the run's identity checked on resume, one writer per
directory, and a full disk that costs nothing but the failed save."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import DEBUG_ARGS, assert_clean_failure, losses_by_step, run_train

ARGS = DEBUG_ARGS + ["checkpoint.save_interval=2"]


def _step(root, step):
    return root / "checkpoints" / f"step_{step:07d}"


def _plt_lines(proc):
    return [x for x in proc.stderr.splitlines() if x.startswith(("plt-train:", "[plt_train]"))]


def test_damaged_checkpoint_falls_back_then_none_left_is_one_line(tmp_path, data_cache):
    """4 KiB of random bytes inside a shard used to load silently and turn into NaN; a
    truncated or deleted file gave tracebacks from every rank."""
    run = tmp_path / "run"
    first = run_train(run, ARGS + ["parallel=data", "train.steps=4",
                                   "train.global_batch_size=4"], nproc=2)
    assert first.returncode == 0
    reference = losses_by_step(run)
    shard = max(_step(run, 4).glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(4096))
    again = run_train(run, ARGS + ["parallel=data", "train.steps=6",
                                   "train.global_batch_size=4"], nproc=2)
    warning = [x for x in _plt_lines(again) if "warning" in x]
    assert len(warning) == 1, again.stderr[-3000:]
    assert f"{_step(run, 4)} is damaged: {shard.name}: checksum mismatch" in warning[0]
    assert warning[0].endswith("falling back to step_0000002")
    resumed = losses_by_step(run)
    assert resumed[3] == pytest.approx(reference[3], rel=1e-5)  # step 3 redone from step 2
    assert resumed[4] == pytest.approx(reference[4], rel=1e-5)
    assert (run / "checkpoints" / "latest.txt").read_text().strip() == "step_0000006"

    # Damage every checkpoint in another way: truncated, deleted, unreadable manifest.
    common = _step(run, 6) / "common.pt"
    common.write_bytes(common.read_bytes()[:100])
    (_step(run, 4) / ".metadata").unlink()
    (_step(run, 2) / "checksums.json").write_text("{not json")
    broken = run_train(run, ARGS + ["parallel=data", "train.steps=8",
                                    "train.global_batch_size=4"], nproc=2, check=False)
    assert_clean_failure(broken, "common.pt: 100 bytes", ".metadata: missing")
    lines = _plt_lines(broken)  # two processes print: their lines may interleave
    error = [x for x in lines if x.startswith("plt-train: ")]
    assert len(error) == 1 and error[0].endswith(
        "checksums.json is unreadable, and there is no older checkpoint to fall back to")
    assert sum("warning" in x for x in lines) == 2


def test_resume_with_another_model_is_one_line(tmp_path, data_cache):
    """Another shape used to fail with a buried 'Global shape mismatch'."""
    run_train(tmp_path, DEBUG_ARGS + ["train.steps=2", "checkpoint.save_at_end=true"])
    proc = run_train(tmp_path, DEBUG_ARGS + ["train.steps=4", "model.hidden_size=128"],
                     check=False)
    assert_clean_failure(proc, "config error: checkpoint: ", "was saved by another model or "
                         "tokenizer (model.hidden_size: 64 in the checkpoint, 128 here")
    assert len(_plt_lines(proc)) == 1


def test_second_writer_is_refused(tmp_path, data_cache):
    """Two runs on one checkpoint directory: the second one's stale-.tmp clean-up used to
    delete the first one's save in progress."""
    from plt_train.training.integrity import WriterLock

    held = WriterLock(tmp_path / "checkpoints")  # the "first run"
    try:
        proc = run_train(tmp_path, DEBUG_ARGS + ["train.steps=2"], check=False)
    finally:
        held.release()
    assert_clean_failure(proc, f"checkpoint directory {tmp_path / 'checkpoints'} is in use by "
                         "another run")
    assert not (tmp_path / "metrics.jsonl").exists()
    run_train(tmp_path, DEBUG_ARGS + ["train.steps=2"])  # free again: runs


@pytest.fixture
def small_disk(tmp_path):
    """A 128 MiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_keeps_the_last_checkpoint_and_the_rerun_works(tmp_path, data_cache,
                                                                 small_disk):
    """A full disk used to end in a long traceback, and the re-run failed later."""
    ckpt = small_disk / "checkpoints"
    args = DEBUG_ARGS + [f"checkpoint.dir={ckpt}", "checkpoint.save_interval=2",
                         "optim.decay_steps=4"]  # one schedule for both lengths
    run_train(tmp_path, args + ["train.steps=2"])
    size = sum(p.stat().st_size for p in (ckpt / "step_0000002").iterdir())
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - size // 2))  # room for less than one more checkpoint
    full = run_train(tmp_path, args + ["train.steps=4"], check=False)
    assert_clean_failure(full, "saving step 4 to", "No space left on device",
                         "step_0000002 is still the latest")
    assert len(_plt_lines(full)) == 1, full.stderr[-3000:]
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000002"]
    filler.unlink()
    run_train(tmp_path, args + ["train.steps=4"])  # space again: resumes at step 2, finishes
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000004"
    assert max(losses_by_step(tmp_path)) == 4


def test_keep_last_keeps_the_newest_and_the_resumed_one(tmp_path, data_cache):
    """checkpoint.keep_last (torchtitan's keep_latest_k); each save's time is logged."""
    ckpt = tmp_path / "checkpoints"
    args = DEBUG_ARGS + ["checkpoint.save_interval=1", "checkpoint.keep_last=2",
                         "optim.decay_steps=7"]
    first = run_train(tmp_path, args + ["train.steps=5"])
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_0000004",
                                                                    "step_0000005"]
    saves = [x for x in first.stdout.splitlines() if x.startswith("[plt_train] saved step_")]
    assert len(saves) == 5 and " MiB) in " in saves[0]
    assert saves[-1].endswith("; deleted step_0000003")
    run_train(tmp_path, args + ["train.steps=7"])  # resumes from step 5: it stays
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "step_0000005", "step_0000006", "step_0000007"]
