"""GPU-only paths: NCCL, bf16, the Transformer Engine backend. Skipped on CPU with a reason.

On a GPU machine: ``pytest tests/gpu``.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.models.common.backends import have_transformer_engine
from tests.helpers import DEBUG_ARGS, losses_by_step, read_metrics, run_train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
needs_te = pytest.mark.skipif(not have_transformer_engine(),
                              reason="needs Transformer Engine (pip install -e .[gpu])")

ARGS = DEBUG_ARGS + ["train.steps=5", "train.global_batch_size=4", "train.micro_batch_size=2"]


@needs_cuda
def test_bf16_nccl_training_runs_and_learns(tmp_path, data_cache):
    run_train(tmp_path, ARGS + ["train.precision=bf16", "model.backend=local"], nproc=1)
    losses = losses_by_step(tmp_path)
    assert losses[5] < losses[1]


@needs_two_gpus
def test_tp2_matches_single_gpu_in_fp32(tmp_path, data_cache):
    run_train(tmp_path / "a", ARGS + ["train.precision=fp32", "model.backend=local"], nproc=1)
    run_train(tmp_path / "b", ARGS + ["train.precision=fp32", "model.backend=local",
                                      "parallel.tensor=2"], nproc=2)
    a, b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)


@needs_cuda
@needs_te
def test_te_backend_matches_local_backend(tmp_path, data_cache):
    run_train(tmp_path / "local", ARGS + ["train.precision=fp32", "model.backend=local"])
    run_train(tmp_path / "te", ARGS + ["train.precision=fp32", "model.backend=te"])
    a, b = losses_by_step(tmp_path / "local"), losses_by_step(tmp_path / "te")
    assert b[1] == pytest.approx(a[1], rel=1e-3)


@needs_cuda
@needs_te
def test_te_backend_keeps_moe_layers(tmp_path, data_cache):
    """The MoE spec goes into TE's layer (it used to be dropped, every layer dense): the
    router's load-balancing loss is logged only by MoE layers."""
    run_train(tmp_path, ARGS + ["model.backend=te", "moe=bigmac", "model.moe.num_experts=8",
                                "model.moe.top_k=2"])
    last = read_metrics(tmp_path)[-1]
    assert last["load_balancing_loss"] > 0
