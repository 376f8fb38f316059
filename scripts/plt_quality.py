"""PLT's accuracy claim, tested: vanilla-L, vanilla-2L, looped-2 and PLT-2 (over L layers) at
equal parameters and equal tokens, several seeds, on a task where depth matters.

    python scripts/plt_quality.py task --jobs 2            # part 1: the recall task, 3 seeds
    python scripts/plt_quality.py task --jobs 2 --models clp-2 clp-2-shared-kv plt-2-w64
    python scripts/plt_quality.py report                   # tables and plots from the JSON

The default task is ``KeyValueRecall`` (``plt_train/data/synthetic.py``): induction lookups
that two layers learn in about 1,500 steps (two CPU minutes) where one layer stays near chance
(docs/benchmarks.md has the calibration and where one layer catches up). Each run is
``plt_train.train`` (under torchrun) on the task's indexed dataset, saving a checkpoint every
``--eval-every`` steps; each checkpoint is then scored by exact match of the whole answer on
held-out examples, generated greedily by the project's KV-cached generator (PLT: its one-pass
decode). Every setting the comparison relies on is pinned here (model shape, dense MLPs, data
parallel, optimizer, schedule, window), so a change of the project's defaults never changes
what it measures; a model's own overrides (``model_overrides``) replace the pinned ones.

Writes ``docs/results/plt_quality.json`` (a list of records: model, loops, variant, task,
seed, tokens, metric, value; merged with records of other parts and runs already there) and a
learning-curve PNG beside it; prints a table of the accuracy after half and all of the steps
(mean, sd, per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plt_train.data.synthetic import (  # noqa: E402
    FunctionChains, KeyValueRecall, Task, VariableChains,
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
        "plt-2-w64-hs": plt + ["model.loop.window=64", "model.loop.hidden_scale=0.05"],
    }


LOOPS = {name: 1 if name.startswith("vanilla") else 2 for name in model_overrides(1)}
DEFAULT_MODELS = ["vanilla-L", "vanilla-2L", "looped-2", "plt-2"]


def with_overrides(settings: list[str], overrides: list[str]) -> list[str]:
    """``settings`` with each ``key=value`` of ``overrides`` replacing the same key's entry
    (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in settings if o.split("=", 1)[0] not in keys] + overrides


def setting(overrides: list[str], key: str) -> str:
    return next(o for o in overrides if o.startswith(f"{key}=")).split("=", 1)[1]


def window_of(overrides: list[str]) -> int | None:
    """The G-SWA window of a PLT with shared K/V; None for a model without one."""
    if "model.name=plt" not in overrides or setting(overrides, "model.loop.shared_kv") == "false":
        return None
    return int(setting(overrides, "model.loop.window")) \
        if setting(overrides, "model.loop.gswa") == "true" else 0


def one_layer_reach(task, examples, overrides: list[str]) -> float | None:
    """The fraction of ``examples`` a PLT over a one-layer block can answer at all on the
    recall task: its later loops reach a lookup only through their own window, since loop
    1's shared K/V of the one layer are computed from the embeddings alone
    (``KeyValueRecall.lookup_distance``).  None where nothing bounds it (no shared K/V,
    another task, or a model without later loops)."""
    window = window_of(overrides)
    if not isinstance(task, KeyValueRecall) or window is None:
        return None
    return sum(task.lookup_distance(p) <= window for p, _ in examples) / len(examples)


def task_settings(task: Task, args) -> list[str]:
    """Everything pinned for part 1 (see the module docstring)."""
    return [
        "model=small", "moe=dense", "parallel=data",
        f"model.seq_length={task.document_length}",  # one example per training sequence
        f"model.hidden_size={args.hidden}", "model.num_attention_heads=4",
        "model.num_query_groups=null", "model.ffn_hidden_size=null",
        "model.tie_embeddings=false", "model.init_method_std=0.02",
        "model.attention_dropout=0.0", "model.hidden_dropout=0.0",
        f"model.loop.window={args.window}", "model.loop.gate=query", "model.loop.gswa=true",
        "model.loop.detach_kv=true", "model.loop.emb_scale=1.0", "model.loop.hidden_scale=1.0",
        "model.loop.norm_between_loops=true", "model.loop.shared_kv=true",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
        "train.eval_interval=0", "train.log_interval=50", "train.precision=fp32",
        f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}", "optim.weight_decay=0.1",
        "optim.beta1=0.9", "optim.beta2=0.95", "optim.clip_grad=1.0",
        f"optim.warmup_steps={max(1, args.steps // 20)}", "optim.decay_style=cosine",
        "data.split='100,0,0'", "data.num_workers=0",
        f"checkpoint.save_interval={args.eval_every}", "checkpoint.save_at_end=true",
        "checkpoint.resume=false", "logging.wandb=false", "sample.prompt=null",
    ]


def train(name: str, seed: int, overrides: list[str], run_dir: Path, steps: int,
          nproc: int) -> float:
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
    return time.perf_counter() - start


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
    """Replace the records of the same (task, model, seed) and keep the others."""
    old = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r["task"], r["model"], r["variant"], r["seed"], r["tokens"], r["metric"])  # noqa: E731
    new = {key(r) for r in records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if key(r) not in new] + records, indent=1) + "\n")


def plot(records: list[dict], path: Path, title: str) -> None:
    """Mean exact match per model against tokens, the band spanning the seeds; the main
    comparison on the left, the ablations (with looped-2 and plt-2 for reference) on the
    right when there are any."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    ablations = [m for m in models if m not in DEFAULT_MODELS]
    panels = [[m for m in models if m in DEFAULT_MODELS]]
    if ablations:
        panels.append([m for m in ("looped-2", "plt-2") if m in models] + ablations)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    colour = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for ax, panel, name in zip(axes[0], panels, ["models", "ablations"]):
        for model in panel:
            by_tokens = {}
            for r in records:
                if r["model"] == model:
                    by_tokens.setdefault(r["tokens"], []).append(r["value"])
            xs = sorted(by_tokens)
            ax.plot(xs, [statistics.mean(by_tokens[x]) for x in xs], color=colour[model],
                    marker=".", label=f"{model} (n={max(len(v) for v in by_tokens.values())})")
            ax.fill_between(xs, [min(by_tokens[x]) for x in xs],
                            [max(by_tokens[x]) for x in xs], color=colour[model], alpha=0.15)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out exact match (band: the seeds' range)")
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_task(args) -> None:
    from plt_train.data.synthetic import read_test, write_task

    if args.kind == "recall":
        task = KeyValueRecall(pairs=args.pairs, queries=args.queries, symbols=args.symbols)
        task_name = f"recall-p{task.pairs}-q{task.queries}-s{task.symbols}"
    elif args.kind == "functions":
        task = FunctionChains(hops=args.hops, functions=args.functions, values=args.values)
        task_name = f"functions-h{task.hops}-f{task.functions}-v{task.values}"
    else:
        task = VariableChains(hops=args.hops, chains=args.chains, answer_digits=args.digits,
                              variables=args.variables)
        task_name = f"chains-h{task.hops}-c{task.chains}-d{task.answer_digits}"
    out = Path(args.out)
    files = write_task(task, out / "data", args.train_examples, args.test_examples, seed=0)
    examples = read_test(files.test)
    models = model_overrides(args.layers)
    settings = task_settings(task, args) + [f"data.prefix={files.prefix}"]
    records, lock = [], threading.Lock()

    def one_run(model: str, seed: int) -> None:
        run_dir = out / f"{model}-s{seed}"
        overrides = with_overrides(settings, models[model])
        wall = train(model, seed, overrides, run_dir, args.steps, args.nproc)
        window = window_of(overrides)
        reach = one_layer_reach(task, examples, overrides) if args.layers == 1 else None
        with lock:  # one generator at a time in this process (its process group is global)
            curve = score(run_dir, examples)
            for step, acc in curve:
                records.append({
                    "model": model, "loops": LOOPS[model], "variant": f"L{args.layers}",
                    "task": task_name, "seed": seed,
                    "tokens": step * args.batch * task.document_length,
                    "metric": "exact_match", "value": acc, "steps": step,
                    "layers": args.layers * (2 if model == "vanilla-2L" else 1),
                    "hidden": args.hidden, "window": window, "lr": args.lr,
                    "reach": reach, "wall_s": round(wall, 1)})
            print(f"[plt_quality] {model} seed {seed}: exact match {curve[-1][1]:.3f} "
                  f"({wall:.0f} s; curve {', '.join(f'{a:.2f}' for _, a in curve)})",
                  flush=True)
            merge(records, Path(args.json))  # partial results survive an interrupted run

    # --jobs trainings at once, each one process of one thread: on a 2-core machine two runs
    # side by side finish the sweep in about half the time (their step times are contended,
    # which the accuracy per step does not see).
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [pool.submit(one_run, m, s) for m in args.models for s in args.seeds]
        try:
            for done in runs:
                done.result()
        except BaseException:  # a failed run stops the sweep, not just its own thread
            pool.shutdown(cancel_futures=True)
            raise
    report(records, Path(args.json))


def report(records: list[dict], json_path: Path) -> None:
    """The final exact match per model (mean, sd, per seed) of each (task, variant), and
    its learning-curve plot.  ``python scripts/plt_quality.py report`` redoes it from the
    JSON, e.g. after runs split over several processes."""
    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    for (task_name, variant), rows in groups.items():
        last = max(r["steps"] for r in rows)
        budgets = sorted({last // 2, last} & {r["steps"] for r in rows})
        any_row = rows[0]
        print(f"\n{task_name}, {variant}, d={any_row['hidden']}: exact match on held-out "
              f"examples after {' and '.join(map(str, budgets))} steps (mean, sd, per seed); "
              "reach: the most a one-layer PLT can answer")
        print(f"{'model':<17}{'window':>7}{'reach':>7}" +
              "".join(f"{f'@{b}':>9}{'sd':>7}  {'per seed':<20}" for b in budgets))
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model]
            window = "-" if mine[0]["window"] is None else mine[0]["window"]
            reach = "-" if mine[0].get("reach") is None else f"{mine[0]['reach']:.3f}"
            line = f"{model:<17}{window:>7}{reach:>7}"
            for b in budgets:
                vals = [r["value"] for r in sorted(mine, key=lambda r: r["seed"])
                        if r["steps"] == b]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                mean = statistics.mean(vals) if vals else float("nan")
                line += f"{mean:>9.3f}{sd:>7.3f}  {' '.join(f'{v:.2f}' for v in vals):<20}"
            print(line)
        plot(rows, json_path.with_name(f"plt_quality_{task_name}_{variant}.png"),
             f"{task_name}, {variant}, d={any_row['hidden']}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("task", help="part 1: a synthetic task where depth matters")
    t.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(LOOPS))
    t.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    t.add_argument("--layers", type=int, default=1, help="L: the shared block's layers")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--window", type=int, default=16)
    t.add_argument("--kind", choices=["recall", "functions", "chains"], default="recall")
    t.add_argument("--pairs", type=int, default=4, help="recall: key-value pairs")
    t.add_argument("--queries", type=int, default=8, help="recall: keys asked per document")
    t.add_argument("--symbols", type=int, default=32, help="recall: distinct tokens")
    t.add_argument("--functions", type=int, default=8)
    t.add_argument("--values", type=int, default=8)
    t.add_argument("--hops", type=int, default=5)
    t.add_argument("--chains", type=int, default=3)
    t.add_argument("--digits", type=int, default=2, help="answer tokens")
    t.add_argument("--variables", type=int, default=48, help="variable names")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--train-examples", type=int, default=100_000)
    t.add_argument("--test-examples", type=int, default=500)
    t.add_argument("--nproc", type=int, default=1, help="processes (data parallel) per run")
    t.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    t.add_argument("--out", default="outputs/plt_quality")
    t.add_argument("--json", default=str(RESULTS))
    r = sub.add_parser("report", help="the tables and plots again, from the JSON")
    r.add_argument("--json", default=str(RESULTS))
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.part == "report":
        report(json.loads(Path(args.json).read_text()), Path(args.json))
    else:
        run_task(args)


if __name__ == "__main__":
    main()
