"""MoE layouts reproduce EP=1 through the main TRAINING loop (fp32, CPU, gloo, 4 processes).

5 optimizer steps of the debug model with fine_grained and with bigmac layers (same seed, same
data, same global batch) at EP=1, EP=2, EP=4 and TP=2 x EP=2 (sequence parallel), all in one
torchrun launch (``train_many.py``): loss curves within 1e-5 of EP=1, gradient norms and
megatron's aux-loss tracker too.  Routing is DROPLESS here on purpose: the comparison must not
depend on the capacity rule (test_moe_layer_parity.py covers capacity dropping separately).
The aux and z losses are on (coefficients 0.01 / 0.001), so their gradients are compared too.
"""
from __future__ import annotations

import json

import pytest

from tests.helpers import DEBUG_ARGS, losses_by_step, read_metrics, torchrun_script

NPROC = 4
STEPS = 5


def _train_args(layer: str, layout: list[str]) -> list[str]:
    return DEBUG_ARGS + [
        f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=1",
        "optim.warmup_steps=1", f"moe={layer}", "model.moe.num_experts=8", "model.moe.top_k=2",
        "model.moe.capacity_factor=null", "model.moe.aux_loss_coeff=0.01",
        "model.moe.z_loss_coeff=0.001"] + layout


LAYOUTS = {"ep1": [], "ep2": ["parallel.expert=2"], "ep4": ["parallel.expert=4"],
           "tp2_ep2": ["parallel.tensor=2", "parallel.sequence_parallel=true",
                       "parallel.expert=2"]}


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("moe_train")
    runs = {str(root / f"{layer}_{name}"): _train_args(layer, layout)
            for layer in ("fine_grained", "bigmac") for name, layout in LAYOUTS.items()}
    spec = root / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun_script("tests/distributed/train_many.py", str(spec), NPROC,
                    timeout=300)
    return root


@pytest.mark.parametrize("layer", ["fine_grained", "bigmac"])
def test_training_loss_curves_match_ep1(train_runs, layer):
    ref_rows = read_metrics(train_runs / f"{layer}_ep1")
    ref = losses_by_step(train_runs / f"{layer}_ep1")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]  # a real trajectory, not a constant
    for name in ("ep2", "ep4", "tp2_ep2"):
        rows = read_metrics(train_runs / f"{layer}_{name}")
        losses = losses_by_step(train_runs / f"{layer}_{name}")
        assert sorted(losses) == sorted(ref)
        for step, want in ref.items():
            assert losses[step] == pytest.approx(want, rel=1e-5), (name, step)
        for row, ref_row in zip(rows, ref_rows):
            assert row["grad_norm"] == pytest.approx(ref_row["grad_norm"], rel=1e-4), name
            # megatron's aux-loss tracker, reduced over ranks: the same in every layout.
            assert row["load_balancing_loss"] == pytest.approx(
                ref_row["load_balancing_loss"], rel=1e-5), name
            assert row["z_loss"] == pytest.approx(ref_row["z_loss"], rel=1e-5), name
        assert rows[-1]["a2a_MB"] > 0 and rows[-1]["a2a_ms"] >= 0  # measured on the wire
    assert all(r["a2a_MB"] == 0 for r in ref_rows)  # EP=1: nothing leaves the rank
