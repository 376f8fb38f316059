"""PLT's accuracy claim, tested: vanilla-L, vanilla-2L, looped-2 and PLT-2 (over L layers) at
equal parameters and equal tokens, several seeds, on a task where depth matters and on
language modelling.  One command per part of the issue:

    python scripts/plt_quality.py task --jobs 2            # part 1: the recall task, 3 seeds
    python scripts/plt_quality.py task --jobs 2 --layers 2 --models looped-2 clp-2-hs \
        clp-2-shared-kv-hs plt-2-hs plt-2-w64-hs   # the chain over a block of two layers
    python scripts/plt_quality.py task --kind pointers --layers 2   # two lookups composed:
                                             # 2 layers against 4 (not calibrated on CPU)
    python scripts/plt_quality.py task --jobs 2 --models clp-2-hs clp-2-shared-kv-hs \
        plt-2-w64-hs plt-2-w64-hs-grad-kv plt-2-w64-hs-input-gate   # part 2: the ablations
    python scripts/plt_quality.py lm --jobs 2              # part 3: language modelling
    python scripts/plt_quality.py lm --preset gpu          # part 3 at 12 layers of d=768
    python scripts/plt_quality.py report                   # tables and plots from the JSON

An interrupted sweep goes on with ``--resume`` (same command): runs that finished in
``--out`` with the same settings are kept, the others are trained.

The looped baseline is ``looped-2-raw``: loop 2 continues loop 1's residual stream, the
textbook looped transformer and ``model.name=looped``'s default.  ``looped-2`` feeds it the
normed output instead (the recipe's pinned ``norm_between_loops=true``, kept so the earlier
records stay reproducible), which leaves its loop 2 close to the identity (docs/benchmarks.md,
issue 19 part 4); the ``-raw`` PLT rows feed ``Embed(x) + shift(h)`` unnormed.

Part 1's task is ``KeyValueRecall`` (``plt_train/data/synthetic.py``): induction lookups
that two layers learn in about 1,500 steps (two CPU minutes) where one layer stays near chance
(docs/benchmarks.md has the calibration and where one layer catches up). Each run is
``plt_train.train`` (under torchrun) on the task's indexed dataset, saving a checkpoint every
``--eval-every`` steps; each checkpoint is then scored by exact match of the whole answer on
held-out examples, generated greedily by the project's KV-cached generator (PLT: its one-pass
decode).  Part 3 trains on the embedded corpus (or ``--prefix``), reads the validation loss
from each run's ``metrics.jsonl``, then times every model's decode step side by side
(``scripts/bench_decode.py --models``) so the loss and the latency stand in one table.
Every setting the comparison relies on is pinned here (model shape, dense MLPs, data
parallel, optimizer, schedule, window, loop input), so a change of the project's defaults
never changes what it measures; a model's own overrides (``model_overrides``) replace the
pinned ones.

Writes ``docs/results/plt_quality.json`` (a list of records: model, loops, variant, task,
seed, tokens, metric, value; merged with records of other parts and runs already there) and a
learning-curve PNG per task beside it; prints a table of the quality after half and all of
the steps (mean, sd, per seed), with the decode latency and KV bytes beside it for part 3.
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_decode import short_name  # noqa: E402
from plt_train.data.synthetic import (  # noqa: E402
    FunctionChains, KeyValueRecall, PointerChasing, Task, VariableChains,
)

RESULTS = REPO / "docs" / "results" / "plt_quality.json"


def model_overrides(layers: int) -> dict[str, list[str]]:
    """The compared models over a shared block of ``layers`` layers (vanilla-2L: 2x layers).
    An override here replaces the pinned setting of the same key (``with_overrides``)."""
    block = f"model.num_layers={layers}"
    plt = ["model.name=plt", "model.loops=2", block]
    return {
        "vanilla-L": ["model.name=vanilla", block],
        "vanilla-2L": ["model.name=vanilla", f"model.num_layers={2 * layers}"],
        "looped-2": ["model.name=looped", "model.loops=2", block],
        # The textbook looped transformer: loop 2 continues loop 1's residual stream. The
        # pinned recipe feeds it through the final norm (the released PLT code's switch),
        # which puts loop 2's input at RMS ~1 against loop 1's ~0.02 (issue 19, part 4):
        "looped-2-raw": ["model.name=looped", "model.loops=2", block,
                         "model.loop.norm_between_loops=false"],
        "plt-2": plt,
        # The ablation chain looped -> +CLP -> +shared KV -> +G-SWA (= plt-2):
        "clp-2": plt + ["model.loop.shared_kv=false"],
        "clp-2-shared-kv": plt + ["model.loop.gswa=false"],
        # PLT's other knobs, one at a time:
        "plt-2-grad-kv": plt + ["model.loop.detach_kv=false"],
        "plt-2-input-gate": plt + ["model.loop.gate=input"],
        "plt-2-w4": plt + ["model.loop.window=4"],
        "plt-2-w8": plt + ["model.loop.window=8"],
        "plt-2-w64": plt + ["model.loop.window=64"],
        "plt-2-w256": plt + ["model.loop.window=256"],
        # The fed-on state at the embeddings' scale (init std 0.02 against a normed state of
        # RMS 1; the third-party reading of LoopCoder-v2 has hidden_scale 0.053):
        "clp-2-hs": plt + ["model.loop.shared_kv=false", "model.loop.hidden_scale=0.05"],
        "plt-2-hs": plt + ["model.loop.hidden_scale=0.05"],
        "plt-2-hs-grad-kv": plt + ["model.loop.hidden_scale=0.05", "model.loop.detach_kv=false"],
        "plt-2-w64-hs": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.05"],
        # The ablations again where the cross-loop models learn (hidden_scale 0.05) and, for
        # PLT, with a window covering every lookup (so the knob, not the reach, is measured):
        "clp-2-shared-kv-hs": plt + ["model.loop.gswa=false", "model.loop.hidden_scale=0.05"],
        "plt-2-w64-hs-grad-kv": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.05",
                                       "model.loop.detach_kv=false"],
        "plt-2-w64-hs-input-gate": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.05",
                                          "model.loop.gate=input"],
        # The same knobs for language modelling, whose sweep window is 64 (plt-2-hs's):
        "plt-2-hs-input-gate": plt + ["model.loop.hidden_scale=0.05", "model.loop.gate=input"],
        "plt-2-w16-hs": plt + ["model.loop.window=16", "model.loop.hidden_scale=0.05"],
        "plt-2-w256-hs": plt + ["model.loop.window=256", "model.loop.hidden_scale=0.05"],
        # PLT with the raw fed-on state, as looped-2-raw: loop 2 reads Embed(x) + shift(h1)
        # (LoopCoder-v2's Eq. 2 as written), both parts at the embeddings' scale:
        "plt-2-raw": plt + ["model.loop.norm_between_loops=false"],
        "clp-2-raw": plt + ["model.loop.shared_kv=false", "model.loop.norm_between_loops=false"],
        "plt-2-w64-raw": plt + ["model.loop.window=64", "model.loop.norm_between_loops=false"],
        # The weight on the fed-on state (issue 19, part 4): fed raw, loop 1's residual
        # stream outgrows the embeddings in training and a later loop loses its own token;
        # plt-2-hs0.02 is PLT's default feed (the fed-on state at the embeddings' init scale):
        "plt-2-raw-hs0.5": plt + ["model.loop.norm_between_loops=false",
                                  "model.loop.hidden_scale=0.5"],
        "plt-2-raw-hs2": plt + ["model.loop.norm_between_loops=false",
                                "model.loop.hidden_scale=2.0"],
        "plt-2-hs0.02": plt + ["model.loop.hidden_scale=0.02"],
        "plt-2-hs0.01": plt + ["model.loop.hidden_scale=0.01"],
        # Nothing fed on: later loops read Embed(x) and loop 1 only through its K/V.
        "plt-2-hs0": plt + ["model.loop.hidden_scale=0.0"],
        "plt-2-w64-hs0": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.0"],
        "plt-2-w64-raw-hs0.5": plt + ["model.loop.window=64", "model.loop.norm_between_loops=false",
                                      "model.loop.hidden_scale=0.5"],
        "plt-2-w64-raw-hs2": plt + ["model.loop.window=64", "model.loop.norm_between_loops=false",
                                    "model.loop.hidden_scale=2.0"],
        "plt-2-w64-hs0.02": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.02"],
    }


LOOPS = {name: 1 if name.startswith("vanilla") else 2 for name in model_overrides(1)}
DEFAULT_MODELS = ["vanilla-L", "vanilla-2L", "looped-2", "looped-2-raw", "plt-2"]
# PLT at the project's default feed (``LoopConfig.hidden_scale``): drawn with the main
# comparison, not among the ablations, although ``plt-2`` (the released form) stays the task's
# default run.
MAIN_PANEL = DEFAULT_MODELS + ["plt-2-hs0.02", "plt-2-w64-hs0.02"]


def with_overrides(settings: list[str], overrides: list[str]) -> list[str]:
    """``settings`` with each ``key=value`` of ``overrides`` replacing the same key's entry
    (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in settings if o.split("=", 1)[0] not in keys] + overrides


def composed(overrides: dict[str, list[str]]) -> dict:
    """Each model's ``RunConfig``, as ``plt_train.train`` will compose it: what the records
    say about a model is read from it, not from the override strings.  In the main thread
    (Hydra's state is global)."""
    from plt_train.config.store import compose_config

    return {model: compose_config(o) for model, o in overrides.items()}


def window_of(model) -> int | None:
    """The window of a PLT's later loops over their own K/V (``model``: a ``ModelConfig``):
    ``loop.window`` with G-SWA, 0 with loop 1's K/V alone; None where the later loops keep
    their own full K/V (or there are none)."""
    if not model.shares_kv:
        return None
    return model.loop.window if model.uses_gswa else 0


def one_layer_reach(task, examples, window: int | None) -> float | None:
    """The fraction of ``examples`` a PLT over a one-layer block can answer at all on the
    recall task: its later loops reach a lookup only through their own window, since loop
    1's shared K/V of the one layer are computed from the embeddings alone
    (``KeyValueRecall.lookup_distance``).  None where nothing bounds it (no shared K/V,
    another task, or a model without later loops)."""
    if window is None or not isinstance(task, KeyValueRecall):
        return None
    return sum(task.lookup_distance(p) <= window for p, _ in examples) / len(examples)


def recipe(args, seq_length: int) -> list[str]:
    """The model shape (but the layers, which each compared model sets), every loop option,
    the optimizer and the schedule: pinned alike for every part."""
    return [
        "model=small", "moe=dense", "parallel=data",
        f"model.seq_length={seq_length}",
        f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        "model.num_query_groups=null", "model.ffn_hidden_size=null",
        "model.tie_embeddings=false", "model.init_method_std=0.02",
        "model.attention_dropout=0.0", "model.hidden_dropout=0.0",
        f"model.loop.window={args.window}", "model.loop.gate=query", "model.loop.gswa=true",
        "model.loop.detach_kv=true", "model.loop.emb_scale=1.0", "model.loop.hidden_scale=1.0",
        "model.loop.norm_between_loops=true", "model.loop.shared_kv=true",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
        "train.log_interval=50", f"train.precision={args.precision}",
        f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}", "optim.weight_decay=0.1",
        "optim.beta1=0.9", "optim.beta2=0.95", "optim.clip_grad=1.0",
        f"optim.warmup_steps={max(1, args.steps // 20)}", "optim.decay_style=cosine",
        "data.num_workers=0", "checkpoint.resume=false", "logging.wandb=false",
        "sample.prompt=null",
    ]


def task_settings(task: Task, args) -> list[str]:
    """Everything pinned for part 1 (see the module docstring): one example per training
    sequence, a checkpoint to score every ``--eval-every`` steps."""
    return recipe(args, task.document_length) + [
        "train.eval_interval=0", "data.split='100,0,0'",
        f"checkpoint.save_interval={args.eval_every}", "checkpoint.save_at_end=true",
    ]


def lm_settings(args) -> list[str]:
    """Everything pinned for part 3: the embedded corpus (``--prefix``: a user's indexed
    dataset) with its 2 % validation split, scored every ``--eval-every`` steps on the same
    ``--eval-iters`` batches for every model; no checkpoints (the curve is in the log)."""
    return recipe(args, args.seq) + [
        f"data.prefix={args.prefix or 'null'}", f"data.vocab_size={args.vocab}",
        "data.split='98,2,0'", f"train.eval_interval={args.eval_every}",
        f"train.eval_iters={args.eval_iters}", "checkpoint.save_interval=0",
        "checkpoint.save_at_end=false",
    ]


RUN_RECORD = "plt_quality_run.json"  # in each run directory: what it was trained with


def train(name: str, seed: int, overrides: list[str], run_dir: Path, steps: int,
          nproc: int, reuse=None, data: str = "") -> float | None:
    """Train one run; its wall time.  ``reuse(run_dir)``: whether a run already in
    ``run_dir`` finished (``--resume``); if it did, with the same settings, it is kept and
    not trained again (an interrupted sweep loses only its unfinished runs).  Finished with
    other settings (``data``: what the data path does not say, e.g. the task's parameters):
    refused, rather than mixed into the records.  A run trained here starts from an empty
    ``run_dir``: its log is appended to, and its checkpoints are all scored."""
    record = run_dir / RUN_RECORD
    settings = {"overrides": sorted(overrides), "steps": steps, "seed": seed, "nproc": nproc,
                "data": data}
    if reuse is not None and record.is_file() and reuse(run_dir):
        kept = json.loads(record.read_text())
        if kept["settings"] != settings:
            raise SystemExit(f"{run_dir} holds a finished run of other settings: give "
                             "another --out, or remove it")
        print(f"[plt_quality] {name} seed {seed}: finished before, kept ({run_dir})",
              flush=True)
        return kept.get("wall_s")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    record.write_text(json.dumps({"settings": settings}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "plt_train.train", f"run_dir={run_dir}",
           f"name=plt_quality_{name}_s{seed}", f"train.steps={steps}", f"train.seed={seed}",
           *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        print(proc.stdout[-4000:])
        raise SystemExit(f"{name} seed {seed} failed ({proc.returncode})")
    wall = time.perf_counter() - start
    record.write_text(json.dumps({"settings": settings, "wall_s": round(wall, 1)}))
    return wall


def score(run_dir: Path, examples) -> list[tuple[int, float]]:
    """(step, exact match) of every checkpoint of a run."""
    from plt_train.data.synthetic import exact_match
    from plt_train.generate import load_for_generation

    out = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*[0-9]")):
        generator, tokenizer = load_for_generation(run_dir, checkpoint=str(ckpt),
                                                   cuda_graph="off")
        out.append((int(ckpt.name.split("_")[1]), exact_match(generator, tokenizer, examples)))
    return out


def merge(records: list[dict], path: Path = RESULTS) -> None:
    """Replace the records of the same (task, model, seed) and keep the others.  Under a
    file lock: sweeps started side by side (another part, other models) write one file."""
    from filelock import FileLock

    key = lambda r: (r["task"], r["model"], r["variant"], r["seed"], r["tokens"], r["metric"])  # noqa: E731
    new = {key(r) for r in records}
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps([r for r in old if key(r) not in new] + records,
                                   indent=1) + "\n")


YLABELS = {"exact_match": "held-out exact match", "valid_loss": "validation loss (nats/token)"}


def curve_points(records: list[dict], model: str,
                 base: dict | None = None) -> dict[int, list[float]]:
    """``model``'s values per tokens, one per seed; with ``base`` ((seed, tokens) ->
    vanilla-L's value) each minus vanilla-L's of the same seed and tokens, and the points
    vanilla-L lacks left out."""
    out = {}
    for r in records:
        if r["model"] != model:
            continue
        if base is None:
            out.setdefault(r["tokens"], []).append(r["value"])
        elif (r["seed"], r["tokens"]) in base:
            out.setdefault(r["tokens"], []).append(r["value"] - base[(r["seed"], r["tokens"])])
    return out


def plot(records: list[dict], path: Path, title: str, metric: str = "exact_match") -> None:
    """Mean ``metric`` per model against tokens, the band spanning the seeds; the main
    comparison on the left, the ablations (with looped-2, and plt-2 on the task, for
    reference) on the right when there are any.  A validation loss is drawn as the paired
    difference to vanilla-L (same seed, same tokens): the models differ by hundredths of a
    nat on curves that fall by two nats, so the raw curves hide what is compared; the y
    range then spans the last three quarters of the budget (the first points differ by
    tenths)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    base = {(r["seed"], r["tokens"]): r["value"] for r in records if r["model"] == "vanilla-L"}
    paired_view = metric == "valid_loss" and bool(base)
    ablations = [m for m in models if m not in MAIN_PANEL]
    panels = [[m for m in models if m in MAIN_PANEL]]
    if ablations:
        references = ("looped-2",) if paired_view else ("looped-2", "plt-2")
        panels.append([m for m in references if m in models] + ablations)
    panels = [p for p in panels if p]  # a run of ablations alone: one panel
    # A panel of many curves (the ablations, always last) has its legend beside it, clear of
    # the curves: the figure is wider by the legend's room.
    crowded = [len(p) > 6 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 2.5 * any(crowded), 4),
                             squeeze=False)
    colour = {m: f"C{i}" if len(models) <= 10 else plt.cm.tab20(i % 20)
              for i, m in enumerate(models)}
    last = max(r["tokens"] for r in records)
    for ax, panel, name, beside in zip(axes[0], panels, ["models", "ablations"], crowded):
        shown = []
        for model in panel:
            by_tokens = curve_points(records, model, base if paired_view else None)
            if not by_tokens:
                continue
            xs = sorted(by_tokens)
            ax.plot(xs, [statistics.mean(by_tokens[x]) for x in xs], color=colour[model],
                    marker=".", label=f"{model} (n={max(len(v) for v in by_tokens.values())})")
            ax.fill_between(xs, [min(by_tokens[x]) for x in xs],
                            [max(by_tokens[x]) for x in xs], color=colour[model], alpha=0.15)
            shown += [v for x in xs if x >= last / 4 for v in by_tokens[x]]
        ax.set_xlabel("training tokens")
        label = YLABELS.get(metric, metric)
        if paired_view and shown:
            label = "valid loss - vanilla-L's, same seed (nats)"
            pad = 0.1 * (max(shown) - min(shown) or 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
            ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {name} (band: the seeds' range)", fontsize=9)
        ax.grid(alpha=0.3)
        if beside:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def sweep(args, one_run, stop: threading.Event | None = None) -> None:
    """``one_run(model, seed)`` for every seed and model, ``--jobs`` at once, each run one
    process of one thread: on a 2-core machine two runs side by side finish the sweep in
    about half the time (their step times are contended, which the quality per step does
    not see).  A failed run stops the sweep: ``stop`` is set, the queued runs do not start,
    the running ones finish, and the failure is raised."""
    stop = stop or threading.Event()

    def guarded(model: str, seed: int) -> None:
        if stop.is_set():
            return
        try:
            one_run(model, seed)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(args.jobs) as pool:
        # seed-major: an interrupted sweep has every model at the first seeds
        runs = [pool.submit(guarded, m, s) for s in args.seeds for m in args.models]
        try:
            done, _ = wait(runs, return_when=FIRST_EXCEPTION)  # the first failure, any run's
        except BaseException:  # Ctrl-C: the running runs finish, the queued ones do not start
            stop.set()
            raise
        for future in done:
            future.result()


def make_task(args) -> tuple[Task, str]:
    """The ``--kind`` of task with its options, and its name in the records: with the
    schedule's length where it is not ``TASK_STEPS`` (as ``lm_task_name``)."""
    task, name = _task(args)
    return task, name + schedule_suffix(args.steps, TASK_STEPS)


def schedule_suffix(steps: int, default: int) -> str:
    """A cosine schedule of other than the part's default length is another experiment:
    its points at the default run's steps must not replace that run's records."""
    return "" if steps == default else f"-steps{steps}"


def _task(args) -> tuple[Task, str]:
    if args.kind == "recall":
        task = KeyValueRecall(pairs=args.pairs, queries=args.queries, symbols=args.symbols)
        return task, f"recall-p{task.pairs}-q{task.queries}-s{task.symbols}"
    if args.kind == "pointers":
        task = PointerChasing(hops=args.hops, pairs=args.pairs, queries=args.queries,
                              symbols=args.symbols)
        return task, f"pointers-h{task.hops}-p{task.pairs}-q{task.queries}-s{task.symbols}"
    if args.kind == "functions":
        task = FunctionChains(hops=args.hops, functions=args.functions, values=args.values)
        return task, f"functions-h{task.hops}-f{task.functions}-v{task.values}"
    task = VariableChains(hops=args.hops, chains=args.chains, answer_digits=args.digits,
                          variables=args.variables)
    return task, f"chains-h{task.hops}-c{task.chains}-d{task.answer_digits}"


def run_task(args) -> None:
    from plt_train.data.synthetic import read_test, write_task

    task, task_name = make_task(args)
    out = Path(args.out)
    files = write_task(task, out / "data", args.train_examples, args.test_examples, seed=0)
    examples = read_test(files.test)
    settings = task_settings(task, args) + [f"data.prefix={files.prefix}"]
    overrides = {m: with_overrides(settings, model_overrides(args.layers)[m])
                 for m in args.models}
    configs = composed(overrides)
    windows = {m: window_of(configs[m].model) for m in args.models}
    reach = {m: one_layer_reach(task, examples, windows[m]) if args.layers == 1 else None
             for m in args.models}
    records, lock = [], threading.Lock()

    def one_run(model: str, seed: int) -> None:
        run_dir = out / f"{model}-s{seed}"
        wall = train(model, seed, overrides[model], run_dir, args.steps, args.nproc,
                     reuse=(lambda d: (d / "checkpoints" / f"step_{args.steps:07d}").is_dir())
                     if args.resume else None,
                     data=f"{task!r} train {args.train_examples} test {args.test_examples}")
        with lock:  # one generator at a time in this process (its process group is global)
            curve = score(run_dir, examples)
            for step, acc in curve:
                records.append({
                    "model": model, "loops": LOOPS[model], "variant": f"L{args.layers}",
                    "task": task_name, "seed": seed,
                    "tokens": step * args.batch * task.document_length,
                    "metric": "exact_match", "value": acc, "steps": step,
                    "layers": configs[model].model.num_layers,
                    "hidden": args.hidden, "window": windows[model], "lr": args.lr,
                    "reach": reach[model], "wall_s": wall and round(wall, 1)})
            print(f"[plt_quality] {model} seed {seed}: exact match {curve[-1][1]:.3f} "
                  f"({wall or 0:.0f} s; curve {', '.join(f'{a:.2f}' for _, a in curve)})",
                  flush=True)
            merge(records, Path(args.json))  # partial results survive an interrupted run

    sweep(args, one_run)
    report_with_earlier(records, Path(args.json))


def lm_task_name(args) -> str:
    """The records' ``task``: the corpus, the sequence length and, where it is not
    ``LM_STEPS``, the schedule's length (a 3,000-step cosine is another experiment than
    1,000 steps: its points at steps 100..1,000 must not replace the shorter run's)."""
    corpus = Path(args.prefix).name if args.prefix else "stdlib"
    return f"lm-{corpus}-seq{args.seq}{schedule_suffix(args.steps, LM_STEPS)}"


def valid_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of a run, from its ``metrics.jsonl``."""
    from plt_train.training.loggers import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, "valid")]


def finished_lm(run_dir: Path, steps: int) -> bool:
    """Whether the run in ``run_dir`` was validated at its last step."""
    from plt_train.training.loggers import METRICS_FILE

    curve = valid_curve(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    return bool(curve) and curve[-1][0] == steps


def run_lm(args) -> None:
    """Part 3: validation loss of each model on language modelling, then the decode latency
    and KV bytes of each model's shape beside it (``decode_latency``)."""
    out, task_name = Path(args.out), lm_task_name(args)
    settings = lm_settings(args)
    overrides = {m: with_overrides(settings, model_overrides(args.layers)[m])
                 for m in args.models}
    configs = composed(overrides)
    records, lock = [], threading.Lock()

    def one_run(model: str, seed: int) -> None:
        run_dir = out / f"{model}-s{seed}"
        wall = train(model, seed, overrides[model], run_dir, args.steps, args.nproc,
                     reuse=(lambda d: finished_lm(d, args.steps)) if args.resume else None,
                     data=str(Path(args.prefix).resolve()) if args.prefix else "embedded")
        curve = valid_curve(run_dir)
        with lock:
            records.extend({
                "model": model, "loops": LOOPS[model], "variant": f"L{args.layers}",
                "task": task_name, "seed": seed, "tokens": step * args.batch * args.seq,
                "metric": "valid_loss", "value": loss, "steps": step,
                "layers": configs[model].model.num_layers,
                "hidden": args.hidden, "window": window_of(configs[model].model),
                "lr": args.lr, "hidden_scale": configs[model].model.loop.hidden_scale,
                "wall_s": wall and round(wall, 1)}
                for step, loss in curve)
            print(f"[plt_quality] {model} seed {seed}: validation loss {curve[-1][1]:.4f} "
                  f"({wall or 0:.0f} s; curve {', '.join(f'{v:.3f}' for _, v in curve)})",
                  flush=True)
            merge(records, Path(args.json))

    sweep(args, one_run)
    if args.latency:  # after the sweep: timings on an otherwise idle machine
        records += decode_latency(args, task_name, configs)
        merge(records, Path(args.json))
    report_with_earlier(records, Path(args.json))


def decode_model(model) -> str | None:
    """``scripts/bench_decode.py``'s ``--models`` entry whose decode step costs what
    ``model`` (a ``ModelConfig``)'s does: vanilla, looped-R or PLT-R with G-SWA, at the
    model's depth and window (the gate's input and detaching change neither the cost nor
    the cache).  None for what bench_decode does not build (CLP with full K/V per loop,
    shared K/V without G-SWA)."""
    name = str(model.name)
    if name == "plt" and not model.uses_gswa:
        return None
    return short_name({"model": name, "loops": model.loops if name != "vanilla" else 1,
                       "layers": model.num_layers,
                       "window": model.loop.window if name == "plt" else None})


def decode_latency(args, task_name: str, configs: dict) -> list[dict]:
    """Per-token decode latency (batch 1, a ``--seq`` context) and KV bytes of each compared
    model's shape, all timed side by side (step by step in turn) in one run of
    ``scripts/bench_decode.py``: random weights (a step's cost does not depend on them),
    ``auto`` step mode and kernel (CUDA graphs and the Triton decode kernel where the device
    has them)."""
    wanted = {m: decode_model(c.model) for m, c in configs.items()}
    specs = list(dict.fromkeys([f"vanilla-1@{args.layers}",
                                *(s for s in wanted.values() if s)]))
    out = Path(args.out) / "decode"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_decode.py"), "--models", *specs,
           f"--layers={args.layers}", f"--hidden={args.hidden}", f"--heads={args.heads}",
           f"--groups={args.heads}", f"--vocab={args.vocab}", f"--window={args.window}",
           f"--prompt={args.seq - args.seq // 2}", f"--new={args.seq // 2}", "--batch", "1",
           "--cuda-graph", "auto", "--kernel", "auto", f"--out={out}"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    timings = json.loads((out / "bench_decode.json").read_text())
    timed = {short_name(r): r for r in timings}
    records = []
    for model, spec in wanted.items():
        if spec is None:
            continue
        r = timed[spec]
        for metric, value in (("decode_ms_per_token", r["ms_per_token"]),
                              ("kv_bytes", r["kv_bytes"])):
            records.append({
                "model": model, "loops": LOOPS[model], "variant": f"L{args.layers}",
                "task": task_name, "seed": None, "tokens": None, "metric": metric,
                "value": value, "batch": 1, "device": r["device"],
                "cuda_graph": r["cuda_graph"], "layers": r["layers"], "hidden": args.hidden,
                "window": r["window"], "context": r["cached_positions"]})
    return records


def paired(diffs: list[float]) -> str:
    """``+0.012 (0.004)``: mean and sd of per-seed differences; ``-`` without any."""
    if not diffs:
        return "-"
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.3f} ({sd:.3f})"


SIDE_METRICS = ("decode_ms_per_token", "kv_bytes")  # per model, printed beside the quality


def report_with_earlier(records: list[dict], json_path: Path) -> None:
    """``report`` of every record in ``json_path`` of the (task, variant)s a sweep wrote:
    a sweep of one model still pairs it with the vanilla-L of an earlier sweep, and the
    plot it redraws keeps the other models' curves."""
    touched = {(r["task"], r["variant"]) for r in records}
    report([r for r in json.loads(json_path.read_text()) if (r["task"], r["variant"]) in touched],
           json_path)


def report(records: list[dict], json_path: Path) -> None:
    """The final quality per model (mean, sd, per seed) of each (task, variant, metric),
    with the decode latency and KV bytes beside it where measured, and its learning-curve
    plot.  ``python scripts/plt_quality.py report`` redoes it from the JSON, e.g. after runs
    split over several processes."""
    side, groups = {}, {}
    for r in records:
        if r["metric"] in SIDE_METRICS:
            side[(r["task"], r["variant"], r["model"], r["metric"])] = r["value"]
        else:
            groups.setdefault((r["task"], r["variant"], r["metric"]), []).append(r)
    for (task_name, variant, metric), rows in groups.items():
        last = max(r["steps"] for r in rows)
        budgets = sorted({last // 2, last} & {r["steps"] for r in rows})
        any_row = rows[0]
        models = list(dict.fromkeys(r["model"] for r in rows))
        timed = {m: [side.get((task_name, variant, m, k)) for k in SIDE_METRICS]
                 for m in models}
        base = timed.get("vanilla-L", [None, None])
        with_side = any(v[0] for v in timed.values()) and all(base)
        at_last = {(r["model"], r["seed"]): r["value"] for r in rows if r["steps"] == last}
        print(f"\n{task_name}, {variant}, d={any_row['hidden']}: {metric} after "
              f"{' and '.join(map(str, budgets))} steps (mean, sd, per seed); vs vanilla-L: "
              f"the mean (sd) over seeds of the difference at {last} steps, same seed (the "
              "same batches)"
              + ("; reach: the most a one-layer PLT can answer" if metric == "exact_match"
                 else "")
              + ("; decode at batch 1 and KV bytes, x vanilla-L" if with_side else ""))
        print(f"{'model':<24}{'window':>7}{'reach':>7}" +
              "".join(f"{f'@{b}':>9}{'sd':>7}  {'per seed':<24}" for b in budgets) +
              f"{'vs vanilla-L':>16}" + (f"{'decode':>8}{'KV':>7}" if with_side else ""))
        for model in models:
            mine = [r for r in rows if r["model"] == model]
            window = "-" if mine[0]["window"] is None else mine[0]["window"]
            reach = "-" if mine[0].get("reach") is None else f"{mine[0]['reach']:.3f}"
            line = f"{model:<24}{window:>7}{reach:>7}"
            for b in budgets:
                vals = [r["value"] for r in sorted(mine, key=lambda r: r["seed"])
                        if r["steps"] == b]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                mean = statistics.mean(vals) if vals else float("nan")
                line += f"{mean:>9.3f}{sd:>7.3f}  {' '.join(f'{v:.3f}' for v in vals):<24}"
            diffs = [v - at_last[("vanilla-L", seed)] for (m, seed), v in at_last.items()
                     if m == model and ("vanilla-L", seed) in at_last]
            line += f"{paired(diffs):>16}"
            if with_side and all(timed[model]):
                line += "".join(f"{v / b:>7.2f}x" for v, b in zip(timed[model], base))
            print(line)
        plot(rows, json_path.with_name(f"plt_quality_{task_name}_{variant}.png"),
             f"{task_name}, {variant}, d={any_row['hidden']}", metric)


# The GPU size (one H100/H200, a 10-minute call; vanilla-2L is 12 layers of d=768): the
# embedded corpus is ~4M tokens, so 1,500 steps of 16 x 1,024 tokens are ~6 epochs of it;
# point --prefix at a real corpus for the few-hundred-million-token version.
LM_GPU_PRESET = dict(layers=6, hidden=768, heads=12, seq=1024, batch=16, steps=1500,
                     eval_every=250, eval_iters=8, lr=6e-4, precision="bf16", seeds=[1])
LM_STEPS = 1000  # calibrated: docs/benchmarks.md
TASK_STEPS = 3000  # the recall task's calibrated budget: docs/benchmarks.md
LM_MODELS = ["vanilla-L", "vanilla-2L", "looped-2", "looped-2-raw", "plt-2", "plt-2-hs",
             "plt-2-hs-grad-kv", "plt-2-hs0.02"]  # plt-2-hs0.02: PLT's default feed
# Part 2 (``--ablations``): the chain looped -> +CLP -> +shared K/V -> +G-SWA and PLT's other
# knobs, at the input scale where the cross-loop models learn; on the task with the window
# that covers every lookup (the sweep's 16 does not), on LM at the sweep's window and beside it.
TASK_ABLATIONS = ["looped-2", "clp-2-hs", "clp-2-shared-kv-hs", "plt-2-w64-hs",
                  "plt-2-w64-hs-grad-kv", "plt-2-w64-hs-input-gate", "looped-2-raw", "clp-2-raw",
                  "plt-2-w64-raw", "plt-2-w64-raw-hs0.5", "plt-2-w64-raw-hs2", "plt-2-w64-hs0.02",
                  "plt-2-w64-hs0"]
LM_ABLATIONS = ["looped-2", "clp-2-hs", "clp-2-shared-kv-hs", "plt-2-hs", "plt-2-hs-input-gate",
                "plt-2-w16-hs", "plt-2-w256-hs", "looped-2-raw", "clp-2-raw", "plt-2-raw",
                "plt-2-raw-hs0.5", "plt-2-hs0.01", "plt-2-hs0"]


# Each task's own defaults of the options tasks share (an option given explicitly wins):
TASK_DEFAULTS = {"recall": {"symbols": 32}, "pointers": {"hops": 2, "symbols": 16},
                 "functions": {"hops": 5, "chains": 3}, "chains": {"hops": 5, "chains": 3}}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    common = argparse.ArgumentParser(add_help=False)  # what every part's sweep takes
    common.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    common.add_argument("--layers", type=int, default=1, help="L: the shared block's layers")
    common.add_argument("--hidden", type=int, default=128)
    common.add_argument("--heads", type=int, default=4)
    common.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    common.add_argument("--nproc", type=int, default=1, help="processes (data parallel) per run")
    common.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    common.add_argument("--json", default=str(RESULTS))
    common.add_argument("--resume", action="store_true",
                        help="keep the runs in --out that finished with the same settings")
    common.add_argument("--ablations", action="store_true",
                        help="part 2: also the ablation chain (CLP, shared K/V, G-SWA) and "
                             "PLT's knobs (TASK_ABLATIONS / LM_ABLATIONS)")

    t = sub.add_parser("task", parents=[common],
                       help="part 1: a synthetic task where depth matters")
    t.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(LOOPS))
    t.add_argument("--window", type=int, default=16)
    t.add_argument("--kind", choices=list(TASK_DEFAULTS), default="recall",
                   help="recall: one lookup (L=1 against 2L=2); pointers: two composed "
                        "(L=2 against 2L=4); functions, chains: the first attempt's tasks")
    t.add_argument("--pairs", type=int, default=4, help="recall, pointers: pairs per table")
    t.add_argument("--queries", type=int, default=8,
                   help="recall, pointers: questions per document")
    t.add_argument("--symbols", type=int,
                   help="recall, pointers: distinct tokens (pointers: per alphabet)")
    t.add_argument("--functions", type=int, default=8)
    t.add_argument("--values", type=int, default=8)
    t.add_argument("--hops", type=int, help="default: the --kind's (TASK_DEFAULTS)")
    t.add_argument("--chains", type=int, help="default: the --kind's (TASK_DEFAULTS)")
    t.add_argument("--digits", type=int, default=2, help="answer tokens")
    t.add_argument("--variables", type=int, default=48, help="variable names")
    t.add_argument("--steps", type=int, default=TASK_STEPS)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--train-examples", type=int, default=100_000)
    t.add_argument("--test-examples", type=int, default=500)
    t.add_argument("--out", default="outputs/plt_quality")

    m = sub.add_parser("lm", parents=[common], help="part 3: language modelling, with the "
                       "decode latency and KV bytes of each model beside its loss")
    m.add_argument("--models", nargs="+", default=LM_MODELS, choices=list(LOOPS))
    m.add_argument("--prefix", default=None,
                   help="a megatron indexed dataset (default: the embedded corpus)")
    m.add_argument("--vocab", type=int, default=8192,
                   help="the embedded corpus's BPE vocabulary (also bench_decode's)")
    m.add_argument("--window", type=int, default=64)
    m.add_argument("--seq", type=int, default=256)
    m.add_argument("--steps", type=int, default=LM_STEPS)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--eval-every", type=int, default=100)
    m.add_argument("--eval-iters", type=int, default=10, help="validation batches")
    m.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip the decode timings after the sweep")
    m.add_argument("--out", default="outputs/plt_quality_lm")
    m.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: the GPU-size comparison (options given explicitly still win)")

    r = sub.add_parser("report", help="the tables and plots again, from the JSON")
    r.add_argument("--json", default=str(RESULTS))
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="cpu")
    if preset.parse_known_args(argv)[0].preset == "gpu":
        m.set_defaults(**LM_GPU_PRESET)  # the preset's values are defaults: given ones win
    args = ap.parse_args(argv)
    if args.part == "task":
        for key, value in TASK_DEFAULTS[args.kind].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if getattr(args, "ablations", False):
        extra = LM_ABLATIONS if args.part == "lm" else TASK_ABLATIONS
        args.models = list(dict.fromkeys(args.models + extra))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.part == "report":
        report(json.loads(Path(args.json).read_text()), Path(args.json))
    elif args.part == "lm":
        run_lm(args)
    else:
        run_task(args)


if __name__ == "__main__":
    main()
