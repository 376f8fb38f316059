"""The README's main job, end to end: `make train` on this 2-core machine (the flagship:
PLT-2 with BigMac MoE layers, experts over 2 expert-parallel ranks).

Acceptance: it finishes in under 10 minutes and its validation loss falls clearly below the
unigram entropy of the corpus (what a model that ignores context would score).  Also checks
what a user relies on: checkpoints, the JSONL metrics, the offline wandb run, the Hydra run
directory written once, and a quiet start (no Python warnings, one line about the optional
accelerators).
"""
from __future__ import annotations

import glob
import os
import re
import time

from tests._wandb_offline import wait_for_history
from tests.helpers import read_metrics, run_process_group

LIMIT_S = 600
CLEAR_MARGIN_NATS = 1.0


def test_make_train_default_run(tmp_path, data_cache):
    run_dir = tmp_path / "main"
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = run_process_group(
        ["make", "--no-print-directory", "train", f"ARGS=run_dir={run_dir}"],
        env, timeout=LIMIT_S + 60)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert wall < LIMIT_S, f"main job took {wall:.0f}s"

    from plt_train.config.schema import DataConfig
    from plt_train.data import prepare_data
    from plt_train.data.stats import unigram_entropy
    entropy = unigram_entropy(prepare_data(DataConfig()).prefix)

    train, valid = read_metrics(run_dir), read_metrics(run_dir, "valid")
    assert [r["step"] for r in valid] == [50, 100, 150, 200]
    assert valid[-1]["loss"] < entropy - CLEAR_MARGIN_NATS, (valid[-1]["loss"], entropy)
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert {"loss", "lr", "grad_norm", "step_ms", "tokens_per_s", "mfu", "eta_s"} <= set(train[-1])
    assert 0 < train[-1]["mfu"] < 1
    print(f"\nmain job: {wall:.0f}s, final val loss {valid[-1]['loss']:.3f} "
          f"vs unigram entropy {entropy:.3f}, {train[-1]['tokens_per_s']:.0f} tok/s")

    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest.txt").read_text().strip() == "step_0000200"
    assert (ckpt / "step_0000100").is_dir()
    assert (run_dir / ".hydra" / "config.yaml").exists()

    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wait_for_history(wandb_file, rows=200)
    logged = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(logged) == 200 and logged[-1] == train[-1]["loss"]
    assert "step 200/200" in proc.stdout and "ETA" in proc.stdout  # progress is shown
    # The flagship: PLT-2 with BigMac layers at EP=2, ending with a one-pass-decoded sample.
    assert {"a2a_MB", "load_balancing_loss"} <= set(train[-1])
    assert "[plt_train] sample: 'def main(' -> '" in proc.stdout
    # A quiet start: megatron-core's and torch's warnings are filtered (by module and
    # message), and the logging rank says once what runs instead of TE and apex.
    output = proc.stdout + proc.stderr
    warned = [line for line in output.splitlines() if re.search(r"\b[A-Z]\w*Warning\b", line)]
    assert not warned, warned[:5]
    assert "Megatron-FSDP" not in output
    assert output.count("not installed: running megatron-core's PyTorch paths") == 1
