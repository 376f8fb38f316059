"""Activation recompute reproduces the step without it at TP=2 (sequence parallel) and PP=2,
for gpt, looped-2, PLT-2 with BigMac MoE layers and PLT-2 with gradients into loop 1's K/V,
with dropout on (``recompute_check.py``
runs one forward/backward per layout, model and mode in one 2-process launch).  The single
process cases, and the memory each mode saves: ``tests/models/test_recompute.py``."""
from __future__ import annotations

import json

import pytest

from tests.helpers import torchrun_script


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute") / "report.json"
    torchrun_script("tests/distributed/recompute_check.py", str(out), 2)
    return json.loads(out.read_text())


def test_recompute_matches_no_recompute_under_tp_and_pp(report):
    expected = {f"{layout}|{model}|{mode}" for layout in ("tp2_sp", "pp2")
                for model in ("gpt", "looped2", "plt2_bigmac", "plt2_grad_kv")
                for mode in ("none", "no_dropout", "full", "selective")}
    assert set(report) == expected
    for key, ranks in report.items():
        if key.endswith("no_dropout"):
            continue
        assert len(ranks) == 2, key
        for rank, r in ranks.items():
            assert r["names_match"], (key, rank)
            # Same operations on the same inputs and dropout masks; only the order in which
            # autograd adds a shared block's per-loop gradients may differ.
            assert r["loss_diff"] < 1e-6, (key, rank, r)
            assert r["grad_max_diff"] <= 1e-5 * r["grad_scale"], (key, rank, r)
            per_pass = r["layers_per_stage"] * r["loops"] * 2  # two micro-batches
            mode = key.rsplit("|", 1)[1]
            # Each (layer, loop, micro-batch) is one megatron checkpoint under full
            # recompute; selective checkpoints the core attention and the MLP / MoE layer.
            want = {"none": 0, "full": per_pass, "selective": 2 * per_pass}[mode]
            assert r["checkpoint_calls"] == want, (key, rank, r)


def test_dropout_was_on(report):
    """The runs drew dropout masks (the same in every mode): without them the loss differs."""
    for layout in ("tp2_sp", "pp2"):
        for model in ("gpt", "looped2", "plt2_bigmac", "plt2_grad_kv"):
            with_masks = report[f"{layout}|{model}|none"]["rank1"]["loss"]
            without = report[f"{layout}|{model}|no_dropout"]["rank1"]["loss"]
            assert abs(with_masks - without) > 1e-4, (layout, model, with_masks, without)
