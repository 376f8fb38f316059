"""``scripts/plt_quality.py`` pins what its comparison relies on (``compare_loops.py`` once ran
BigMac after a default changed), and every model it compares is a valid run of the shape it
claims: the same shared block for vanilla-L, looped-2 and the PLT variants, twice the layers
for vanilla-2L, one example per training sequence."""
from __future__ import annotations

from dataclasses import fields

import pytest

from plt_train.config.schema import LoopConfig
from plt_train.data.synthetic import VariableChains
from plt_train.models import validate
from tests.helpers import compose_run, load_script

plt_quality = load_script("plt_quality")


def _args(*argv):
    return plt_quality.parse_args(["task", *argv])


def test_a_model_override_replaces_the_pinned_setting_once():
    merged = plt_quality.with_overrides(["a=1", "model.loop.window=16", "b=2"],
                                        ["model.loop.window=64", "c=3"])
    assert merged == ["a=1", "b=2", "model.loop.window=64", "c=3"]


def test_every_loop_option_and_the_training_recipe_are_pinned():
    task = VariableChains()
    keys = {o.split("=")[0] for o in plt_quality.task_settings(task, _args())}
    assert {f"model.loop.{f.name}" for f in fields(LoopConfig)} - {"model.loop.kernel"} <= keys
    assert {"model.seq_length", "model.hidden_size", "model.num_attention_heads",
            "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_style",
            "train.micro_batch_size", "train.global_batch_size", "train.precision"} <= keys
    assert {"moe", "parallel", "model"} <= keys  # the group presets too


@pytest.mark.parametrize("model", list(plt_quality.LOOPS))
def test_each_compared_model_is_the_claimed_shape(model, tmp_path):
    args = _args("--layers", "2", "--window", "8")
    task = VariableChains(hops=args.hops, chains=args.chains)
    overrides = plt_quality.with_overrides(plt_quality.task_settings(task, args),
                                           plt_quality.model_overrides(args.layers)[model])
    cfg = compose_run(overrides)
    validate(cfg, 1)
    m = cfg.model
    assert str(m.moe.layer) == "dense" and cfg.parallel.tensor == cfg.parallel.pipeline == 1
    assert m.seq_length == task.document_length
    windows = {"plt-2-w4": 4, "plt-2-w8": 8, "plt-2-w64": 64, "plt-2-w256": 256,
               "plt-2-w64-hs": 64}
    assert m.loop.window == windows.get(model, 8)
    assert str(m.loop.gate) == ("input" if model == "plt-2-input-gate" else "query")
    assert m.loops == plt_quality.LOOPS[model] or str(m.name) == "vanilla"
    assert m.num_layers == (4 if model == "vanilla-2L" else 2)
    assert m.loop.hidden_scale == (0.05 if model.endswith("-hs") else 1.0)
    plt_variants = ("plt-2", "plt-2-grad-kv", "plt-2-input-gate", "plt-2-hs", *windows)
    assert m.shares_kv == (model in plt_variants + ("clp-2-shared-kv",))
    assert m.uses_gswa == (model in plt_variants)
    assert m.loop.detach_kv == (model != "plt-2-grad-kv")


compare_loops = load_script("compare_loops")


@pytest.mark.parametrize("model", list(compare_loops.MODELS))
def test_compare_loops_runs_dense_models_whatever_the_defaults(model):
    cfg = compose_run(compare_loops.DEFAULT_SET + compare_loops.MODELS[model])
    validate(cfg, 2)
    assert str(cfg.model.moe.layer) == "dense" and cfg.parallel.expert == 1
    assert cfg.model.num_layers == 2 and cfg.model.loop.window == 64


def test_one_layer_reach_counts_the_lookups_inside_the_window():
    import random

    from plt_train.data.synthetic import KeyValueRecall

    task, rng = KeyValueRecall(), random.Random(0)
    examples = [task.example(rng) for _ in range(200)]
    distances = [task.lookup_distance(p) for p, _ in examples]
    args = _args("--window", "8")
    settings = plt_quality.task_settings(task, args)
    models = plt_quality.model_overrides(1)

    def reach(model):
        overrides = plt_quality.with_overrides(settings, models[model])
        return plt_quality.one_layer_reach(task, examples, overrides)

    assert reach("plt-2") == sum(d <= 8 for d in distances) / 200
    assert reach("plt-2-w64") == 1.0 > reach("plt-2") > reach("plt-2-w4") > 0
    assert reach("clp-2-shared-kv") == 0.0  # no window: loop 1's K/V only
    assert reach("clp-2") is reach("looped-2") is reach("vanilla-2L") is None


def test_a_failed_run_stops_the_sweep(tmp_path, monkeypatch):
    started = []

    def train(model, seed, overrides, run_dir, steps, nproc):
        started.append((model, seed))
        raise SystemExit(f"{model} seed {seed} failed (1)")

    monkeypatch.setattr(plt_quality, "train", train)
    args = _args("--models", "vanilla-L", "plt-2", "--seeds", "1", "2", "--jobs", "1",
                 "--train-examples", "20", "--test-examples", "4", "--out", str(tmp_path),
                 "--json", str(tmp_path / "records.json"))
    with pytest.raises(SystemExit, match="vanilla-L seed 1 failed"):
        plt_quality.run_task(args)
    assert started == [("vanilla-L", 1)]  # the queued runs were cancelled, not trained
