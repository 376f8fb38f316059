"""The pinned settings of ``scripts/compare_moe.py`` and ``scripts/bench_cluster.py`` are valid runs
at their world sizes (a drifted default fails here, not after an hour of benchmarking), and the
equal-wall-time arithmetic of compare_moe: steps that fit in fine_grained's time, losses read
off the validation curve."""
from __future__ import annotations

from pathlib import Path

import pytest

from plt_train.models import validate
from tests.helpers import compose_run, load_script


compare_moe = load_script("compare_moe")
bench_cluster = load_script("bench_cluster")


def without_run_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("run_dir=")]


@pytest.mark.parametrize("preset, nproc", [("bench", 2), ("small", 2), ("gpu", 1)])
@pytest.mark.parametrize("variant", ["dense", "fine_grained", "bigmac", "bigmac+fp8"])
def test_compare_moe_runs_are_valid(preset, nproc, variant, tmp_path):
    args = compare_moe.parse_args(["--preset", preset, "--nproc", str(nproc)])
    overrides = compare_moe.overrides(variant, 1, 150, args, tmp_path)
    cfg = compose_run(without_run_dir(overrides))
    validate(cfg, nproc)
    assert cfg.optim.decay_style == "constant" and cfg.optim.min_lr == cfg.optim.lr
    if variant == "dense":  # the same active MLP width as top-8 of r = 0.25 experts
        assert cfg.model.ffn_hidden_size == 2 * cfg.model.hidden_size
    else:
        assert cfg.model.moe.top_k == 8 and cfg.model.moe.capacity_factor == 1.2
        assert cfg.parallel.expert == nproc


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("layer, ep", [("dense", 2), ("fine_grained", 2), ("bigmac", 4)])
def test_bench_cluster_runs_are_valid(layer, ep, tiny, tmp_path):
    args = bench_cluster.parse_args(["--tiny"] if tiny else [])
    cfg = compose_run(without_run_dir(bench_cluster.overrides(layer, ep, 8, args, tmp_path)))
    validate(cfg, ep)
    # Weak scaling: the same tokens per rank at every EP.
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * \
        bench_cluster.MICRO_BATCHES * ep


def bench_row(layer, step_ms, rate, args, topk=8):
    overrides = compare_moe.overrides(layer, 1, 10, args, Path("/x"))
    return {"layer": layer, "ep": 2, "topk": None if layer == "dense" else topk,
            "link_mbit": rate, "step_ms": step_ms, "overrides": overrides}


def test_equal_time_steps_fit_fine_grained_budget():
    args = compare_moe.parse_args(["--steps", "100"])
    bench = [bench_row("fine_grained", 9000.0, 50.0, args), bench_row("bigmac", 3000.0, 50.0, args),
             bench_row("dense", 2000.0, 50.0, args), bench_row("fine_grained", 1.0, None, args),
             bench_row("fine_grained", 5000.0, 200.0, args)]
    steps, step_ms, rate = compare_moe.equal_time_steps(
        bench, ["dense", "fine_grained", "bigmac"], args)
    assert rate == 50.0  # the lowest rate measured, by default
    assert steps == {"fine_grained": 100, "bigmac": 300, "dense": 450}
    args.link_mbit = 200.0
    with pytest.raises(SystemExit, match="no bigmac run"):
        compare_moe.equal_time_steps(bench, ["fine_grained", "bigmac"], args)


def test_equal_time_refuses_step_times_of_another_shape():
    args = compare_moe.parse_args([])
    bench = [bench_row("fine_grained", 9000.0, 50.0, compare_moe.parse_args(
        ["--preset", "small"]))]
    with pytest.raises(SystemExit, match="do not apply"):
        compare_moe.equal_time_steps(bench, ["fine_grained"], args)


def test_loss_is_interpolated_between_evaluations():
    curve = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}, {"step": 30, "loss": 3.5}]
    assert compare_moe.loss_at(curve, 20) == 4.0
    assert compare_moe.loss_at(curve, 25) == pytest.approx(3.75)
    assert compare_moe.loss_at(curve, 5) == 5.0 and compare_moe.loss_at(curve, 99) == 3.5


def test_calibrated_rates_give_the_target_shares():
    base = {"step_ms": 2000.0, "a2a_ms": 200.0, "a2a_bytes": 100e6}
    rates = bench_cluster.calibrate(base, [0.5, 0.9])
    # share s: bytes * 8 / rate = s / (1 - s) * 1.8 s
    assert rates == [float(f"{800 / 1.8:.2g}"), float(f"{800 / 16.2:.2g}")]
