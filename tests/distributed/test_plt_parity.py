"""Looped decoders under tensor, sequence, data and pipeline parallelism match the single
process (fp32, gloo).

Same seed, same data, 5 optimizer steps: looped-2 and PLT-2/3 (window 8 < sequence 64, so the
G-SWA local branch and the shift both matter) at TP=2 (heads and gates split), DP=2, TP=2
with sequence parallelism (the cross-loop shift then crosses the TP ranks' slices) and PP=2
(each loop a virtual pipeline chunk of megatron's interleaved schedule; with
``detach_kv=false`` the later loops' gradient into loop 1's K/V is handed over between the
chunks' backward passes).  With ``parallel.overlap_grad_reduce`` (small buckets, two
micro-batches per rank) the same: a bucket reduced before the block's last loop added its
gradient would leave that loop's share unreduced and the replicas would drift apart.
"""
from __future__ import annotations

import pytest

from tests.helpers import DEBUG_ARGS, losses_by_step, run_train

STEPS = 5
COMMON = DEBUG_ARGS + [f"train.steps={STEPS}", "train.global_batch_size=4",
                       "train.micro_batch_size=2", "optim.warmup_steps=1", "model.loops=2",
                       "model.loop.window=8"]
MODELS = {
    "looped2": ["model.name=looped"],
    "plt2": ["model.name=plt"],
    "plt2_input_gate_no_detach": ["model.name=plt", "model.loop.gate=input",
                                  "model.loop.detach_kv=false"],
    "plt3_no_detach": ["model.name=plt", "model.loops=3", "model.loop.detach_kv=false"],
    # cross-loop parallelism alone: every loop attends to its own K/V (issue 19's ablation)
    "plt2_no_shared_kv": ["model.name=plt", "model.loop.shared_kv=false"],
}


# Overlapped gradient reduce in many small buckets, over two micro-batches per rank.
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.bucket_size=20000",
           "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_cache):
    cache = {}

    def get(model: str) -> dict:
        if model not in cache:
            run_dir = tmp_path_factory.mktemp(f"single_{model}")
            run_train(run_dir, COMMON + MODELS[model], nproc=1)
            cache[model] = losses_by_step(run_dir)
            assert sorted(cache[model]) == list(range(1, STEPS + 1))
            assert cache[model][STEPS] < cache[model][1]  # a real trajectory
        return cache[model]
    return get


# Each case is a 2-process training run (~10-30 s): a layout that another case covers is left
# out.  TP=2 with sequence parallelism splits the heads and gates as TP=2 alone does, and the
# overlapped-reduce cases are data parallel (DP=2) with the reduce inside the backward pass.
@pytest.mark.parametrize("model,layout", [
    ("looped2", ["parallel.tensor=2"]),
    ("plt2", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("plt2_input_gate_no_detach", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("looped2", ["parallel.pipeline=2"]),
    ("plt2", ["parallel.pipeline=2"]),
    ("plt3_no_detach", ["parallel.pipeline=2"]),
    ("plt2_no_shared_kv", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("plt2_no_shared_kv", ["parallel.pipeline=2"]),
    ("looped2", OVERLAP),
    ("plt2", OVERLAP),
], ids=["looped2-tp2", "plt2-tp2_sp", "plt2_input_gate_no_detach-tp2_sp", "looped2-pp2",
        "plt2-pp2", "plt3_no_detach-pp2", "plt2_no_shared_kv-tp2_sp", "plt2_no_shared_kv-pp2",
        "looped2-dp2-overlap", "plt2-dp2-overlap"])
def test_looped_models_match_single_process(model, layout, references, tmp_path):
    reference = references(model)
    proc = run_train(tmp_path, COMMON + MODELS[model] + layout, nproc=2)
    if layout == OVERLAP:  # several buckets, each reduced from inside the backward pass
        assert "gradient reduce overlapped with the backward pass: " in proc.stdout
        assert "pass: 1 bucket(s)" not in proc.stdout
    losses = losses_by_step(tmp_path)
    assert sorted(losses) == sorted(reference)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), (step, losses[step], ref)


def test_overlapped_reduce_under_pipeline_parallelism_matches_single_process(references,
                                                                             tmp_path):
    """PP=2 x DP=2: each loop a virtual chunk with its own backward pass, so the block's
    gradients arrive in several backward passes before their buckets may go."""
    reference = references("plt2")
    proc = run_train(tmp_path, COMMON + MODELS["plt2"] + OVERLAP + ["parallel.pipeline=2"],
                     nproc=4)
    assert "gradient reduce overlapped with the backward pass" in proc.stdout
    losses = losses_by_step(tmp_path)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), (step, losses[step], ref)
