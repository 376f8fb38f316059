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

import json
import subprocess
import sys

import pytest

from tests.helpers import (
    DEBUG_ARGS, REPO, losses_by_step, one_process_env, read_metrics, run_train, train_many,
)

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
DOWNSTREAM = ["downstream.tasks=[plt_tiny_mc,plt_tiny_gen]", "downstream.interval=2",
              "checkpoint.save_interval=2"]

# Each case is a 2-process training run: a layout that another case covers is left out.  TP=2
# with sequence parallelism splits the heads and gates as TP=2 alone does, and the
# overlapped-reduce cases are data parallel (DP=2) with the reduce inside the backward pass.
CASES = {
    "looped2-tp2": ("looped2", ["parallel.tensor=2"]),
    "plt2-tp2_sp": ("plt2", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "plt2_input_gate_no_detach-tp2_sp": ("plt2_input_gate_no_detach",
                                         ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "looped2-pp2": ("looped2", ["parallel.pipeline=2"]),
    "plt2-pp2": ("plt2", ["parallel.pipeline=2"]),
    "plt3_no_detach-pp2": ("plt3_no_detach", ["parallel.pipeline=2"]),
    "plt2_no_shared_kv-tp2_sp": ("plt2_no_shared_kv",
                                 ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "plt2_no_shared_kv-pp2": ("plt2_no_shared_kv", ["parallel.pipeline=2"]),
    "looped2-dp2-overlap": ("looped2", OVERLAP),
    # ... and lm-eval tasks every 2 steps (test_downstream_evaluation_... below).
    "plt2-dp2-overlap-downstream": ("plt2", OVERLAP + DOWNSTREAM),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_cache):
    """Every model's single-process losses: one 1-process launch for all of them."""
    root = tmp_path_factory.mktemp("single")
    train_many(root, {root / m: COMMON + args for m, args in MODELS.items()}, nproc=1)
    out = {}
    for model in MODELS:
        out[model] = losses_by_step(root / model)
        assert sorted(out[model]) == list(range(1, STEPS + 1))
        assert out[model][STEPS] < out[model][1]  # a real trajectory
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, data_cache):
    """Every 2-process case, one after another in one launch: {case: (run_dir, output)}."""
    root = tmp_path_factory.mktemp("layouts")
    runs = {root / case: COMMON + MODELS[model] + layout for case, (model, layout) in CASES.items()}
    output = train_many(root, runs, nproc=2)
    return {case: (root / case, output[str(root / case)]) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_looped_models_match_single_process(case, references, layouts):
    (model, layout), (run_dir, output) = CASES[case], layouts[case]
    reference = references[model]
    if "parallel.overlap_grad_reduce=true" in layout:  # several buckets, each reduced from
        assert "gradient reduce overlapped with the backward pass: " in output  # inside the
        assert "pass: 1 bucket(s)" not in output  # backward pass
    losses = losses_by_step(run_dir)
    assert sorted(losses) == sorted(reference)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), (step, losses[step], ref)


def test_overlapped_reduce_under_pipeline_parallelism_matches_single_process(references,
                                                                             tmp_path):
    """PP=2 x DP=2: each loop a virtual chunk with its own backward pass, so the block's
    gradients arrive in several backward passes before their buckets may go."""
    reference = references["plt2"]
    proc = run_train(tmp_path, COMMON + MODELS["plt2"] + OVERLAP + ["parallel.pipeline=2"],
                     nproc=4)
    assert "gradient reduce overlapped with the backward pass" in proc.stdout
    losses = losses_by_step(tmp_path)
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), (step, losses[step], ref)


METRICS = ("plt_tiny_mc/acc", "plt_tiny_mc/acc_norm", "plt_tiny_gen/exact_match")


def test_downstream_evaluation_in_training_leaves_it_exact_and_equals_plt_eval(layouts,
                                                                               tmp_path):
    """PLT-2 at DP=2 (overlapped reduce) evaluates lm-eval tasks every 2 steps, its requests
    sharded over the two ranks: its losses match the single process without the evaluation
    (the parity case ``plt2-dp2-overlap-downstream``: eval mode, no gradients; the harness's
    seeding is undone, checked in tests/evaluation since this model has no dropout), and
    ``plt-eval`` of the step-2 checkpoint (one process, every request) gives the metrics
    logged at step 2."""
    run_dir, output = layouts["plt2-dp2-overlap-downstream"]
    rows = {r["step"]: r for r in read_metrics(run_dir, "downstream")}
    assert sorted(rows) == [2, 4, 5]  # every interval and the last step
    assert "downstream step 2/5 | plt_tiny_mc/acc " in output

    out = tmp_path / "step2.json"
    ev = subprocess.run([sys.executable, "-m", "plt_train.evaluate", str(run_dir), "--tasks",
                         "plt_tiny_mc,plt_tiny_gen", "--checkpoint",
                         str(run_dir / "checkpoints" / "step_0000002"), "--output", str(out)],
                        cwd=REPO, env=one_process_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "plt_tiny_mc" in ev.stdout and "acc_norm" in ev.stdout  # the harness's table
    results = json.loads(out.read_text())
    assert {k: results["plt_train"]["metrics"][k] for k in METRICS} == \
        pytest.approx({k: rows[2][k] for k in METRICS}, abs=1e-9)
    # 16 and 12 documents: the sharded evaluation saw them all, not one rank's half.
    assert {t: n["effective"] for t, n in results["n-samples"].items()} == \
        {"plt_tiny_mc": 16, "plt_tiny_gen": 12}
