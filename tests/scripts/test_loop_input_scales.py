"""``scripts/loop_input_scales.py``: the measurement behind the looped model's raw feed
(docs/benchmarks.md, issue 19 part 4), end to end at a small width."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import DEBUG_ARGS, REPO, load_script, one_process_env, run_train


def test_the_normed_feed_leaves_a_looped_models_second_loop_nearly_still(tmp_path):
    out = tmp_path / "scales.json"
    proc = subprocess.run([sys.executable, "scripts/loop_input_scales.py", "--hidden", "64",
                           "--layers", "1", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=one_process_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = {(r["form"], r["loop"]): r["ratio"] for r in json.loads(out.read_text())}
    assert len(ratio) == 10  # five forms, two loops each
    first = ratio[("looped, raw (default)", 1)]
    assert ratio[("looped, normed", 2)] < 0.1 * first
    for form in ("looped, raw (default)", "plt, normed x 0.02 (default)", "plt, raw x 1.0"):
        assert ratio[(form, 2)] > 0.25 * first, form
    assert "looped, normed" in proc.stdout and "update/input" in proc.stdout


def test_the_two_parts_sum_to_what_loop_two_reads(one_rank):
    """The split the trained-run measurement reports is the input loop 2's first layer gets
    in the model's own forward, for each feed (a hook reads it there)."""
    import torch

    from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
    from plt_train.models import build_model
    from plt_train.runtime.device import megatron_device_kwargs

    scales = load_script("loop_input_scales")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    for normed, hidden_scale in ((False, 0.5), (True, 0.05)):
        m = ModelConfig(name="plt", loops=2, num_layers=1, hidden_size=64,
                        num_attention_heads=4, seq_length=32, init_method_std=0.02,
                        loop=LoopConfig(window=8, hidden_scale=hidden_scale, emb_scale=0.7,
                                        norm_between_loops=normed))
        chunks, _, _ = build_model(m, ParallelConfig(), 256, torch.float32,
                                   megatron_device_kwargs(one_rank), 1, one_rank.device)
        model, seen = chunks[0].eval(), []
        model.decoder.layers[0].register_forward_pre_hook(
            lambda _, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()),
            with_kwargs=True)
        with torch.no_grad():
            model(tokens, torch.arange(32)[None])
        emb, fed = scales.loop2_input_parts(model, tokens)
        torch.testing.assert_close(emb + fed, seen[1], rtol=1e-6, atol=1e-7)
        assert float(fed[1:].pow(2).mean()) > 1e-3 * float(emb.pow(2).mean())  # both present


def test_trained_runs_report_each_checkpoint(tmp_path, data_cache):
    run = tmp_path / "plt"
    run_train(run, DEBUG_ARGS + ["model.name=plt", "model.loops=2", "model.loop.window=8",
                                 "model.loop.norm_between_loops=false",
                                 "model.loop.hidden_scale=0.5", "train.steps=2",
                                 "checkpoint.save_interval=1", "checkpoint.save_at_end=true"])
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, "scripts/loop_input_scales.py", "--runs", str(run),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=one_process_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["hidden_scale"] == 0.5 and r["normed"] is False for r in records)
    assert all(r["ratio"] == pytest.approx(r["fed_rms"] / r["emb_rms"]) for r in records)
    assert "fed/Embed" in proc.stdout and "raw x 0.5" in proc.stdout

    looped = tmp_path / "looped"
    run_train(looped, DEBUG_ARGS + ["model.name=looped", "model.loops=2", "train.steps=2",
                                    "checkpoint.save_at_end=true"])
    proc = subprocess.run([sys.executable, "scripts/loop_input_scales.py", "--runs",
                           str(looped)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=one_process_env(OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "splits a PLT's later-loop input" in proc.stderr
