"""GPT with fine_grained and with bigmac MoE layers train through the main training loop
(2 processes, expert parallel 2, capacity factor 1.2 as in the paper): the loss falls, the MoE
metrics are logged, and a checkpoint saved at EP=2 resumes at EP=2 and, resharded, at EP=1
with the same next-step loss; the distributed optimizer matches the plain one."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import DEBUG_ARGS, losses_by_step, read_metrics, torchrun_script

STEPS = 30
COMMON = [a for a in DEBUG_ARGS if not a.startswith("checkpoint.save_at_end")] + [
    f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
    "optim.warmup_steps=3", "optim.lr=3e-3", "train.eval_interval=15", "train.eval_iters=2",
    "model.moe.num_experts=8", "model.moe.top_k=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("moe_train")
    ckpt = root / "bigmac_ep2" / "checkpoints"
    resume = [f"checkpoint.load={ckpt / 'step_0000030'}", f"train.steps={STEPS + 2}",
              "train.eval_interval=0", "checkpoint.save_at_end=false"]
    spec = {
        str(root / "fine_grained_ep2"): COMMON + ["moe=fine_grained", "parallel.expert=2",
                                                  "checkpoint.save_at_end=false"],
        str(root / "bigmac_ep2"): COMMON + ["moe=bigmac", "parallel.expert=2",
                                            "checkpoint.save_at_end=true"],
        # ... and lm-eval tasks every 15 steps: every rank runs every request in lockstep (the
        # experts exchange tokens), and the trajectory stays the plain optimizer's.
        str(root / "bigmac_ep2_distopt"): COMMON + ["moe=bigmac", "parallel.expert=2",
                                                    "parallel.use_distributed_optimizer=true",
                                                    "checkpoint.save_at_end=false",
                                                    "downstream.tasks=[plt_tiny_mc]",
                                                    "downstream.interval=15",
                                                    "downstream.limit=6"],
        str(root / "resume_ep2"): COMMON + ["moe=bigmac", "parallel.expert=2"] + resume,
        str(root / "resume_ep1"): COMMON + ["moe=bigmac", "parallel.expert=1"] + resume,
    }
    (root / "runs.json").write_text(json.dumps(spec))
    torchrun_script("tests/distributed/train_many.py", str(root / "runs.json"), nproc=2,
                    timeout=300)
    return root


@pytest.mark.parametrize("layer", ["fine_grained", "bigmac"])
def test_moe_gpt_trains_and_logs_moe_metrics(runs, layer):
    run_dir = runs / f"{layer}_ep2"
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 1.0, (losses[1], losses[STEPS])
    valid = read_metrics(run_dir, "valid")
    assert [r["step"] for r in valid] == [15, 30] and valid[1]["loss"] < valid[0]["loss"]
    last = read_metrics(run_dir)[-1]
    # megatron's load-balancing loss (1.0 = perfectly balanced), all-to-all traffic, MFU
    # from the MoE FLOP count.
    assert 0.9 < last["load_balancing_loss"] < 3.0
    assert last["a2a_MB"] > 0 and last["a2a_ms"] > 0 and last["a2a_ms_max"] >= last["a2a_ms"]
    assert 0 < last["mfu"] < 1


def test_distributed_optimizer_gives_the_same_trajectory(runs):
    """Expert parameters in megatron's DistributedOptimizer (sharded over the expert-data-
    parallel group) train exactly like the plain optimizer, also with a downstream evaluation
    (lm-eval, BigMac at EP=2) every 15 steps."""
    plain, dist = losses_by_step(runs / "bigmac_ep2"), losses_by_step(runs / "bigmac_ep2_distopt")
    assert sorted(plain) == sorted(dist)
    for step in plain:
        assert dist[step] == pytest.approx(plain[step], rel=1e-5), step
    evaluated = read_metrics(runs / "bigmac_ep2_distopt", "downstream")
    assert [r["step"] for r in evaluated] == [15, 30]
    assert all(0 <= r["plt_tiny_mc/acc"] <= 1 and r["seconds"] > 0 for r in evaluated)


def test_bigmac_moves_a_quarter_of_fine_grained_bytes_in_training(runs):
    """Same model, data and seed: the routing differs once the weights differ, so not exactly
    r x (tests/distributed/test_moe_layer_parity.py checks the exact ratio); on average close."""
    fg = [r["a2a_MB"] for r in read_metrics(runs / "fine_grained_ep2")]
    bm = [r["a2a_MB"] for r in read_metrics(runs / "bigmac_ep2")]
    assert sum(bm) / sum(fg) == pytest.approx(0.25, rel=0.1)


def test_checkpoint_resumes_and_reshards_across_expert_parallel_sizes(runs):
    assert (runs / "bigmac_ep2" / "checkpoints" / "step_0000030").is_dir()
    ep2, ep1 = losses_by_step(runs / "resume_ep2"), losses_by_step(runs / "resume_ep1")
    assert sorted(ep2) == sorted(ep1) == [STEPS + 1, STEPS + 2]
    for step in ep2:
        assert ep1[step] == pytest.approx(ep2[step], rel=1e-5), step
    assert ep2[STEPS + 1] < losses_by_step(runs / "bigmac_ep2")[1] - 1.0  # weights were loaded


def test_expert_bias_is_updated_each_step_and_checkpointed(tmp_path, data_cache):
    """Auxiliary-loss-free balancing in a real run (EP=2): every MoE layer's router carries an
    expert bias in the checkpoint, moved by +-bias_update_rate once per optimizer step (so a
    multiple of the rate, at most steps x rate), not left at zero."""
    from tests.helpers import checkpoint_tensors, run_train

    steps, rate = 4, 1e-3
    run_train(tmp_path, COMMON[:1] + [a for a in COMMON[1:] if not a.startswith("train.")] + [
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.eval_interval=0", "moe=fine_grained", "parallel.expert=2",
        "model.moe.router_score_function=sigmoid", "model.moe.expert_bias=true",
        f"model.moe.bias_update_rate={rate}", "model.moe.aux_loss_coeff=0",
        "checkpoint.save_at_end=true"], nproc=2)
    saved = checkpoint_tensors(tmp_path / "checkpoints" / f"step_{steps:07d}", tmp_path)
    (bias,) = [v for k, v in saved.items() if k.endswith("router.expert_bias")]
    assert bias.shape == (4, 8)  # megatron stacks the layers: 4 MoE layers x 8 experts
    steps_taken = bias / rate
    assert torch.allclose(steps_taken, steps_taken.round(), atol=1e-3)
    assert steps_taken.abs().max() <= steps
    assert (steps_taken.abs().sum(dim=1) > 0).all()  # every layer's bias moved
