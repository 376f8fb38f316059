"""Dry run: a cluster-sized config is validated and sized without any process group."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from plt_train.models.plan import plan
from tests.helpers import REPO, compose_run

BIG = ["model=1b", "moe=dense", "parallel=data", "parallel.tensor=8", "parallel.pipeline=4", "train.global_batch_size=1024",
       "train.micro_batch_size=2"]


def test_1024_gpu_plan():
    r = plan(compose_run(BIG), world_size=1024, vocab_size=32000)
    assert (r.tp, r.pp, r.dp, r.layers_per_stage, r.micro_batches) == (8, 4, 32, 4, 16)
    assert 0.9e9 < r.total_params < 1.0e9  # the ~1B benchmark model
    # TP=8 x PP=4 split it; the first stage also holds the embedding, so a bit over 1/32.
    assert r.total_params / 32 < r.params_per_rank < r.total_params / 16
    dist = plan(compose_run(BIG + ["parallel.use_distributed_optimizer=true"]), 1024, 32000)
    assert dist.optimizer_gib == pytest.approx(r.optimizer_gib / 32)
    assert dist.weights_gib == r.weights_gib


@pytest.mark.parametrize("overrides", [
    ["moe=dense"],
    ["moe=bigmac", "model.moe.num_experts=8"],
    ["moe=fine_grained", "model.moe.num_experts=8", "model.moe.num_shared_experts=1"],
    ["moe=dense", "model.name=plt", "model.loops=2"],
    ["moe=bigmac", "model.moe.num_experts=8", "model.name=plt", "model.loops=3",
     "model.loop.gate=input"],
], ids=["dense", "bigmac", "fine_grained_shared", "plt2", "plt3_input_gate_bigmac"])
def test_parameter_count_matches_the_built_model(overrides):
    from plt_train.config.schema import ParallelConfig
    from plt_train.models import build_model
    from plt_train.runtime import destroy_distributed, detect_device, init_distributed
    from plt_train.runtime.device import megatron_device_kwargs

    cfg = compose_run(["model=debug", "parallel=data", "parallel.expert=1"] + overrides)
    dev = detect_device()
    init_distributed(dev)
    try:
        (model,), _, _ = build_model(cfg.model, ParallelConfig(), 1000, torch.float32,
                                     megatron_device_kwargs(dev), 0, dev.device)
        built = sum(p.numel() for p in model.parameters())
    finally:
        destroy_distributed()
    r = plan(cfg, world_size=1, vocab_size=1000, bf16=False)
    assert r.total_params == built == r.params_per_rank


def test_moe_plan_splits_experts_over_expert_parallel_ranks():
    """The default flagship (BigMac, 64 experts) at EP=2 and EP=8: each rank holds its share
    of the experts whole, and everything else in full (TP=1)."""
    from plt_train.models.moe.flops import moe_layer_parameters

    cfg = compose_run([])
    batch = "train.global_batch_size=64"
    one = plan(compose_run(["parallel.expert=1", batch]), world_size=8, vocab_size=8192)
    per_expert = moe_layer_parameters(cfg.model)["per_expert"]
    for ep in (2, 8):
        r = plan(compose_run([f"parallel.expert={ep}", batch]), world_size=8, vocab_size=8192)
        assert r.experts_per_rank == 64 // ep and r.total_params == one.total_params
        assert one.params_per_rank - r.params_per_rank == \
            cfg.model.num_layers * (64 - 64 // ep) * per_expert


def test_cli_rejects_an_impossible_cluster_config():
    proc = subprocess.run([sys.executable, "-m", "plt_train.dryrun", "--world-size", "1000",
                           *BIG], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: parallel: world size 1000 is not divisible by" in proc.stderr


def test_cli_rejects_a_vocab_below_the_tokenizers():
    proc = subprocess.run([sys.executable, "-m", "plt_train.dryrun", "--world-size", "1024",
                           "--vocab-size", "32000", "model.vocab_size=30000", *BIG], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: model.vocab_size" in proc.stderr


@pytest.mark.parametrize("argv, words", [
    (["--world-size", "0"], "--world-size must be >= 1, got 0"),
    (["--world-size", "-2"], "--world-size must be >= 1, got -2"),
    (["--world-size", "8", "--vocab-size", "0"], "--vocab-size must be >= 1"),
    (["--world-size", "8", "foo.bar=1"], "Could not override 'foo.bar'"),
])
def test_cli_refuses_bad_arguments_in_one_line(argv, words):
    """A ZeroDivisionError (world size 0) or a plan with negative memory (-2) before."""
    proc = subprocess.run([sys.executable, "-m", "plt_train.dryrun", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_cli_prints_the_plan():
    proc = subprocess.run([sys.executable, "-m", "plt_train.dryrun", "--world-size", "1024",
                           *BIG, "model.name=plt", "model.loops=2",
                           "model.recompute.granularity=selective",
                           "model.recompute.modules=[core_attn,mlp]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "8 x 4 x 1 x 32" in proc.stdout and "memory / rank: total" in proc.stdout
    assert "selective (core_attn, mlp)" in proc.stdout  # the recompute mode
    assert "activations / micro-batch (est.)" in proc.stdout


def test_installed_entry_point_works_outside_the_repo(tmp_path):
    """The console scripts come from the installed package, not from the repo being the cwd."""
    from pathlib import Path
    exe = Path(sys.executable).parent / "plt-dryrun"
    proc = subprocess.run([str(exe), "--world-size", "1024", *BIG], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layers per pipeline stage" in proc.stdout


def test_activation_estimate_counts_loops_and_recompute():
    """The plan's activation memory grows with the loops (every loop keeps its activations),
    PLT's later loops keep a little more (G-SWA's second branch), and recompute shrinks it;
    ``scripts/bench_memory.py`` checks the same figures against a measurement
    (tests/scripts/test_bench_memory.py)."""
    def act(*extra):
        return plan(compose_run(BIG + list(extra)), 1024, 32000).activation_bytes

    gpt = act()
    looped, plt2 = act("model.name=looped", "model.loops=2"), act("model.name=plt", "model.loops=2")
    assert 1.8 < looped / gpt < 2.0  # two loops of the block, one LM head
    assert looped < plt2 < 1.1 * looped
    full = act("model.recompute.granularity=full")
    first = act("model.recompute.granularity=full", "model.recompute.num_layers=1")
    selective = act("model.recompute.granularity=selective", "model.recompute.modules=[mlp]")
    assert full < first < gpt and full < selective < gpt
    plt_full = act("model.name=plt", "model.loops=2", "model.recompute.granularity=full")
    assert plt_full < 0.3 * plt2
