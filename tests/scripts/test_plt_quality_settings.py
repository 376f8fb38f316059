"""``scripts/plt_quality.py`` pins what its comparison relies on (``compare_loops.py`` once ran
BigMac after a default changed), and every model it compares is a valid run of the shape it
claims: the same shared block for vanilla-L, looped-2 and the PLT variants, twice the layers
for vanilla-2L, one example per training sequence."""
from __future__ import annotations

import re
from dataclasses import fields

import pytest

from plt_train.config.schema import LoopConfig
from plt_train.data.synthetic import KeyValueRecall, PointerChasing, VariableChains
from plt_train.models import validate
from tests.helpers import compose_run, load_script

plt_quality = load_script("plt_quality")
bench_decode = load_script("bench_decode")


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


def named_window(model: str, default: int) -> int:
    """The window a model's name says: "-wN", else the sweep's ``default``."""
    window = re.search(r"-w(\d+)", model)
    return int(window.group(1)) if window else default


def named_hidden_scale(model: str) -> float:
    """The ``hidden_scale`` a model's name says: "-hs" 0.05, "-hsX" X, else the recipe's 1.0."""
    scale = re.search(r"-hs([\d.]+)?", model)
    return float(scale.group(1) or 0.05) if scale else 1.0


@pytest.mark.parametrize("model", list(plt_quality.LOOPS))
def test_each_compared_model_is_the_claimed_shape(model, tmp_path):
    args = _args("--kind", "pointers", "--layers", "2", "--window", "8")
    task, _ = plt_quality.make_task(args)
    overrides = plt_quality.with_overrides(plt_quality.task_settings(task, args),
                                           plt_quality.model_overrides(args.layers)[model])
    cfg = compose_run(overrides)
    validate(cfg, 1)
    m = cfg.model
    assert str(m.moe.layer) == "dense" and cfg.parallel.tensor == cfg.parallel.pipeline == 1
    assert m.seq_length == task.document_length
    window, hidden_scale = named_window(model, 8), named_hidden_scale(model)
    assert m.loop.window == window
    assert str(m.loop.gate) == ("input" if model.endswith("input-gate") else "query")
    assert m.loops == plt_quality.LOOPS[model] or str(m.name) == "vanilla"
    assert m.num_layers == (4 if model == "vanilla-2L" else 2)
    assert m.loop.hidden_scale == hidden_scale
    assert m.loop.norm_between_loops == ("-raw" not in model)
    plt_variant = model.startswith("plt-2")
    assert m.shares_kv == (plt_variant or model.startswith("clp-2-shared-kv"))
    assert m.uses_gswa == plt_variant
    assert m.loop.detach_kv == (not model.endswith("grad-kv"))
    assert plt_quality.window_of(m) == (window if m.uses_gswa else 0 if m.shares_kv else None)


compare_loops = load_script("compare_loops")


@pytest.mark.parametrize("model", list(compare_loops.MODELS))
def test_compare_loops_runs_dense_models_whatever_the_defaults(model):
    cfg = compose_run(plt_quality.with_overrides(compare_loops.DEFAULT_SET,
                                                 compare_loops.MODELS[model]))
    validate(cfg, 2)
    assert str(cfg.model.moe.layer) == "dense" and cfg.parallel.expert == 1
    assert cfg.model.num_layers == 2 and cfg.model.loop.window == 64
    assert cfg.model.loop.norm_between_loops == (not model.endswith("-raw"))


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
        window = plt_quality.window_of(compose_run(overrides).model)
        return plt_quality.one_layer_reach(task, examples, window)

    assert reach("plt-2") == sum(d <= 8 for d in distances) / 200
    assert reach("plt-2-w64") == 1.0 > reach("plt-2") > reach("plt-2-w4") > 0
    assert reach("clp-2-shared-kv") == 0.0  # no window: loop 1's K/V only
    assert reach("clp-2") is reach("looped-2") is reach("vanilla-2L") is None


def test_a_failed_run_stops_the_sweep(tmp_path, monkeypatch):
    started = []

    def train(model, seed, overrides, run_dir, steps, nproc, reuse=None, data=""):
        started.append((model, seed))
        raise SystemExit(f"{model} seed {seed} failed (1)")

    monkeypatch.setattr(plt_quality, "train", train)
    args = _args("--models", "vanilla-L", "plt-2", "--seeds", "1", "2", "--jobs", "1",
                 "--train-examples", "20", "--test-examples", "4", "--out", str(tmp_path),
                 "--json", str(tmp_path / "records.json"))
    with pytest.raises(SystemExit, match="vanilla-L seed 1 failed"):
        plt_quality.run_task(args)
    assert started == [("vanilla-L", 1)]  # the queued runs were cancelled, not trained


def _lm_args(*argv):
    return plt_quality.parse_args(["lm", *argv])


@pytest.mark.parametrize("model", list(dict.fromkeys(
    plt_quality.LM_MODELS + ["plt-2-grad-kv"] + plt_quality.LM_ABLATIONS)))
def test_each_language_model_is_the_claimed_shape_on_the_embedded_corpus(model):
    args = _lm_args()
    settings = plt_quality.lm_settings(args)
    keys = {o.split("=")[0] for o in settings}
    assert {f"model.loop.{f.name}" for f in fields(LoopConfig)} - {"model.loop.kernel"} <= keys
    cfg = compose_run(plt_quality.with_overrides(settings,
                                                 plt_quality.model_overrides(1)[model]))
    validate(cfg, 1)
    m = cfg.model
    assert str(m.moe.layer) == "dense" and m.seq_length == args.seq == 256
    assert cfg.data.prefix is None and cfg.data.split == "98,2,0"
    assert cfg.train.eval_interval == args.eval_every and cfg.train.eval_iters == 10
    # no checkpoints: 10 of ~24 MB each per run were written at the default interval
    assert cfg.checkpoint.save_interval == 0 and not cfg.checkpoint.save_at_end
    assert m.num_layers == (2 if model == "vanilla-2L" else 1)
    assert m.loop.window == named_window(model, 64)
    assert m.loop.detach_kv == (not model.endswith("grad-kv"))
    assert str(m.loop.gate) == ("input" if model.endswith("input-gate") else "query")
    assert m.loop.hidden_scale == named_hidden_scale(model)
    assert m.loop.norm_between_loops == ("-raw" not in model)
    # what its decode latency is timed as (bench_decode's --models, at the model's own
    # window); CLP and shared K/V without G-SWA are not built there
    assert plt_quality.decode_model(m) == {
        "vanilla-L": "vanilla-1@1", "vanilla-2L": "vanilla-1@2", "looped-2": "looped-2@1",
        "looped-2-raw": "looped-2@1", "clp-2-raw": None, "clp-2-hs": None,
        "clp-2-shared-kv-hs": None, "plt-2-w16-hs": "plt-2@1:w16",
        "plt-2-w256-hs": "plt-2@1:w256"}.get(model, "plt-2@1:w64")
    spec = plt_quality.decode_model(m)
    if spec is not None:  # decode_latency finds the timing again under bench_decode's name
        name, loops, layers, window = bench_decode.parse_model(spec, layers=5, window=7)
        record = {"model": name, "loops": loops, "layers": layers, "window": window}
        assert plt_quality.short_name(record) == spec


def test_a_longer_schedule_is_recorded_as_another_task():
    """Its curve's points at the shorter run's steps must not replace that run's records."""
    assert plt_quality.lm_task_name(_lm_args()) == "lm-stdlib-seq256"
    assert plt_quality.lm_task_name(_lm_args("--steps", "3000")) == "lm-stdlib-seq256-steps3000"


def test_loss_curves_are_drawn_as_the_paired_difference_to_vanilla_l(tmp_path):
    rec = lambda m, seed, tokens, v: {"model": m, "seed": seed, "tokens": tokens,  # noqa: E731
                                      "value": v, "metric": "valid_loss"}
    records = [rec("vanilla-L", 1, 10, 5.0), rec("vanilla-L", 2, 10, 4.0),
               rec("plt-2-hs", 1, 10, 4.75), rec("plt-2-hs", 2, 10, 4.5),
               rec("plt-2-hs", 3, 10, 1.0)]  # seed 3: no vanilla-L to pair with
    base = {(r["seed"], r["tokens"]): r["value"] for r in records if r["model"] == "vanilla-L"}
    assert plt_quality.curve_points(records, "plt-2-hs", base) == {10: [-0.25, 0.5]}
    assert plt_quality.curve_points(records, "plt-2-hs") == {10: [4.75, 4.5, 1.0]}
    plt_quality.plot(records, tmp_path / "lm.png", "lm", "valid_loss")
    assert (tmp_path / "lm.png").stat().st_size > 1000


def test_each_task_has_its_own_defaults_and_given_options_win():
    task, name = plt_quality.make_task(_args("--kind", "pointers"))
    assert isinstance(task, PointerChasing) and (task.hops, task.symbols) == (2, 16)
    assert name == "pointers-h2-p4-q8-s16"
    task, name = plt_quality.make_task(_args("--kind", "pointers", "--hops", "3"))
    assert task.hops == 3 and name == "pointers-h3-p4-q8-s16"
    task, name = plt_quality.make_task(_args("--kind", "functions"))
    assert (task.hops, name) == (5, "functions-h5-f8-v8")  # the first attempt's defaults
    task, name = plt_quality.make_task(_args())
    assert isinstance(task, KeyValueRecall) and name == "recall-p4-q8-s32"
    # another schedule is another experiment (its early points are not the default run's)
    assert plt_quality.make_task(_args("--steps", "6000"))[1] == "recall-p4-q8-s32-steps6000"


def test_ablations_add_each_parts_chain_once():
    lm = _lm_args("--ablations")
    assert lm.models[:len(plt_quality.LM_MODELS)] == plt_quality.LM_MODELS
    assert set(lm.models) == set(plt_quality.LM_MODELS + plt_quality.LM_ABLATIONS)
    assert len(lm.models) == len(set(lm.models))
    task = plt_quality.parse_args(["task", "--ablations", "--models", "vanilla-L"])
    assert task.models == ["vanilla-L"] + plt_quality.TASK_ABLATIONS
    assert plt_quality.parse_args(["task"]).models == plt_quality.DEFAULT_MODELS


def test_the_gpu_preset_is_the_issue_size_and_explicit_options_win():
    args = _lm_args("--preset", "gpu", "--steps", str(plt_quality.LM_STEPS))
    assert (args.layers, args.hidden, args.heads, args.seq, args.precision, args.steps) == (
        6, 768, 12, 1024, "bf16", plt_quality.LM_STEPS)  # given, so kept: equal to the
    assert plt_quality.LM_GPU_PRESET["steps"] != plt_quality.LM_STEPS  # CPU default
    overrides = plt_quality.with_overrides(plt_quality.lm_settings(args),
                                           plt_quality.model_overrides(6)["vanilla-2L"])
    assert "train.precision=bf16" in overrides
    cfg = compose_run(plt_quality.with_overrides(overrides, ["train.precision=fp32"]))
    validate(cfg, 1)  # bf16 itself validates on CUDA only
    assert cfg.model.num_layers == 12 and cfg.model.hidden_size == 768


def test_the_report_puts_latency_and_kv_beside_the_loss(tmp_path, capsys):
    task, variant = "lm-stdlib-seq256", "L1"
    rows = [{"model": m, "loops": 2, "variant": variant, "task": task, "seed": seed,
             "tokens": step * 10, "metric": "valid_loss", "value": loss + 0.01 * seed,
             "steps": step, "hidden": 128, "window": None}
            for m, loss in (("vanilla-L", 5.0), ("plt-2", 4.5))
            for seed in (1, 2) for step in (50, 100)]
    side = [{"model": m, "variant": variant, "task": task, "seed": None, "tokens": None,
             "metric": metric, "value": value}
            for m, metric, value in (("vanilla-L", "decode_ms_per_token", 2.0),
                                     ("plt-2", "decode_ms_per_token", 2.5),
                                     ("vanilla-L", "kv_bytes", 1000),
                                     ("plt-2", "kv_bytes", 1250))]
    plt_quality.report(rows + side, tmp_path / "records.json")
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert lines["plt-2"].split()[-2:] == ["1.25x", "1.25x"]
    assert lines["vanilla-L"].split()[-2:] == ["1.00x", "1.00x"]
    assert "4.515" in lines["plt-2"] and "0.007" in lines["plt-2"]  # mean and sd @100
    assert "-0.500 (0.000)" in lines["plt-2"]  # paired by seed: 4.51 - 5.01, 4.52 - 5.02
    assert "+0.000 (0.000)" in lines["vanilla-L"]
    assert (tmp_path / f"plt_quality_{task}_{variant}.png").is_file()


def test_a_sweep_of_one_model_reports_it_beside_the_earlier_sweeps(tmp_path, capsys):
    """The table and the plot a sweep ends with cover every record of its task and variant
    in the JSON (an earlier sweep's vanilla-L to pair with, its curves kept), not another
    task's."""
    row = lambda m, task, loss: {"model": m, "loops": 2, "variant": "L1", "task": task,  # noqa: E731
                                 "seed": 1, "tokens": 1000, "metric": "valid_loss",
                                 "value": loss, "steps": 100, "hidden": 128, "window": None}
    path = tmp_path / "records.json"
    earlier = [row("vanilla-L", "lm-a", 5.0), row("looped-2", "lm-a", 5.1),
               row("vanilla-L", "lm-b", 4.0)]
    mine = [row("looped-2-raw", "lm-a", 4.9)]
    plt_quality.merge(earlier + mine, path)
    plt_quality.report_with_earlier(mine, path)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "-0.100" in lines["looped-2-raw"] and "looped-2" in lines
    assert "lm-a," in lines and "lm-b," not in lines
    assert (tmp_path / "plt_quality_lm-a_L1.png").is_file()
    assert not (tmp_path / "plt_quality_lm-b_L1.png").exists()


def test_a_failed_run_stops_the_runs_queued_behind_a_running_one():
    """With two jobs: run ("b", 1) fails while ("a", 1) is still running; the runs queued
    behind them do not start, whichever of the two the pool would hand them to."""
    import threading

    stop, started = threading.Event(), []

    def one_run(model, seed):
        started.append((model, seed))
        if (model, seed) == ("b", 1):
            raise SystemExit("b seed 1 failed (1)")
        if (model, seed) == ("a", 1):
            assert stop.wait(60)  # still running when b fails

    args = plt_quality.parse_args(["task", "--jobs", "2", "--seeds", "1", "2", "3"])
    args.models = ["a", "b"]
    with pytest.raises(SystemExit, match="b seed 1 failed"):
        plt_quality.sweep(args, one_run, stop)
    assert sorted(started) == [("a", 1), ("b", 1)]


def test_resume_keeps_finished_runs_of_the_same_settings_only(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(plt_quality.subprocess, "run", lambda cmd, **kw: trained.append(cmd)
                        or plt_quality.subprocess.CompletedProcess(cmd, 0, ""))
    run_dir, finished = tmp_path / "plt-2-s1", lambda d: True
    (run_dir / "checkpoints").mkdir(parents=True)  # an earlier run's leftovers
    (run_dir / "metrics.jsonl").write_text('{"kind": "valid", "step": 10, "loss": 9.0}\n')
    assert plt_quality.train("plt-2", 1, ["a=1", "b=2"], run_dir, 10, 1) is not None
    assert len(trained) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [plt_quality.RUN_RECORD]
    # the same settings (in any order): kept, with the wall time it took
    wall = plt_quality.train("plt-2", 1, ["b=2", "a=1"], run_dir, 10, 1, reuse=finished)
    assert len(trained) == 1 and wall is not None
    # not finished: trained again
    plt_quality.train("plt-2", 1, ["a=1", "b=2"], run_dir, 10, 1, reuse=lambda d: False)
    assert len(trained) == 2
    with pytest.raises(SystemExit, match="other settings"):
        plt_quality.train("plt-2", 1, ["a=1", "b=3"], run_dir, 10, 1, reuse=finished)
    with pytest.raises(SystemExit, match="other settings"):
        plt_quality.train("plt-2", 2, ["a=1", "b=2"], run_dir, 10, 1, reuse=finished)
    with pytest.raises(SystemExit, match="other settings"):  # same paths, other data
        plt_quality.train("plt-2", 1, ["a=1", "b=2"], run_dir, 10, 1, reuse=finished,
                          data="recall-p8")
    assert len(trained) == 2


def test_a_language_model_run_is_finished_when_validated_at_its_last_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "valid", "step": 50, "loss": 5.0}\n{"kind": "train", "step": 100}\n')
    assert not plt_quality.finished_lm(tmp_path, 100)
    assert plt_quality.finished_lm(tmp_path, 50)
    assert not plt_quality.finished_lm(tmp_path / "missing", 50)
