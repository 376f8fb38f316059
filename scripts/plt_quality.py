"""PLT's accuracy claim, tested: vanilla-L, vanilla-2L, looped-2 and PLT-2 (over L layers) at
equal parameters and equal tokens, several seeds, on a task where depth matters.

    python scripts/plt_quality.py task                     # part 1: multi-hop variable resolution
    python scripts/plt_quality.py task --seeds 1 2 3 --steps 1500 --models vanilla-L plt-2

Each run is ``plt_train.train`` (under torchrun) on the synthetic task's indexed dataset
(``plt_train/data/synthetic.py``), saving a checkpoint every ``--eval-every`` steps; each
checkpoint is then scored by exact match of the whole answer on held-out examples, generated
greedily by the project's KV-cached generator (PLT: its one-pass decode).  Every setting the
comparison relies on is pinned here (model shape, dense MLPs, data parallel, optimizer,
schedule, window), so a change of the project's defaults never changes what it measures.

Writes ``docs/results/plt_quality.json`` (a list of records: model, loops, variant, task,
seed, tokens, metric, value; merged with records of other parts and runs already there) and a
learning-curve PNG beside it; prints a table of the final accuracy (mean, sd, per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plt_train.data.synthetic import FunctionChains, VariableChains  # noqa: E402

RESULTS = REPO / "docs" / "results" / "plt_quality.json"


def model_overrides(layers: int) -> dict[str, list[str]]:
    """The compared models over a shared block of ``layers`` layers (vanilla-2L: 2x layers)."""
    return {
        "vanilla-L": ["model.name=vanilla", f"model.num_layers={layers}"],
        "vanilla-2L": ["model.name=vanilla", f"model.num_layers={2 * layers}"],
        "looped-2": ["model.name=looped", "model.loops=2", f"model.num_layers={layers}"],
        "plt-2": ["model.name=plt", "model.loops=2", f"model.num_layers={layers}"],
        "plt-2-grad-kv": ["model.name=plt", "model.loops=2", f"model.num_layers={layers}",
                          "model.loop.detach_kv=false"],
        # The ablation chain looped -> +CLP -> +shared KV -> +G-SWA (= plt-2):
        "clp-2": ["model.name=plt", "model.loops=2", f"model.num_layers={layers}",
                  "model.loop.shared_kv=false"],
        "clp-2-shared-kv": ["model.name=plt", "model.loops=2", f"model.num_layers={layers}",
                            "model.loop.gswa=false"],
    }


LOOPS = {"vanilla-L": 1, "vanilla-2L": 1, "looped-2": 2, "plt-2": 2, "plt-2-grad-kv": 2,
         "clp-2": 2, "clp-2-shared-kv": 2}
DEFAULT_MODELS = ["vanilla-L", "vanilla-2L", "looped-2", "plt-2"]


def task_settings(task: VariableChains, args) -> list[str]:
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in records)):
        mine = [r for r in records if r["model"] == model]
        for j, seed in enumerate(sorted({r["seed"] for r in mine})):
            pts = sorted((r["tokens"], r["value"]) for r in mine if r["seed"] == seed)
            ax.plot(*zip(*pts), color=f"C{i}", alpha=0.8, marker=".",
                    label=model if j == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("exact match, held-out examples")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_task(args) -> None:
    from plt_train.data.synthetic import read_test, write_task

    if args.kind == "functions":
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
    records = []
    for model in args.models:
        for seed in args.seeds:
            run_dir = out / f"{model}-s{seed}"
            wall = train(model, seed, settings + models[model], run_dir, args.steps, args.nproc)
            curve = score(run_dir, examples)
            for step, acc in curve:
                records.append({
                    "model": model, "loops": LOOPS[model], "variant": f"L{args.layers}",
                    "task": task_name, "seed": seed,
                    "tokens": step * args.batch * task.document_length,
                    "metric": "exact_match", "value": acc, "steps": step,
                    "layers": args.layers * (2 if model == "vanilla-2L" else 1),
                    "hidden": args.hidden, "window": args.window, "wall_s": round(wall, 1)})
            print(f"[plt_quality] {model} seed {seed}: exact match {curve[-1][1]:.3f} "
                  f"({wall:.0f} s; curve {', '.join(f'{a:.2f}' for _, a in curve)})",
                  flush=True)
            merge(records, Path(args.json))  # partial results survive an interrupted run
    report(records, Path(args.json))


def report(records: list[dict], json_path: Path) -> None:
    """The final exact match per model (mean, sd, per seed) of each (task, variant), and
    its learning-curve plot.  ``python scripts/plt_quality.py report`` redoes it from the
    JSON, e.g. after runs split over several processes."""
    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    for (task_name, variant), rows in groups.items():
        last = {}
        for r in rows:  # each run's last checkpoint
            key = (r["model"], r["seed"])
            if r["steps"] >= last.get(key, {"steps": -1})["steps"]:
                last[key] = r
        any_row = rows[0]
        print(f"\n{task_name}, {variant}, d={any_row['hidden']}, window {any_row['window']}: "
              "exact match on held-out examples at the last checkpoint")
        print(f"{'model':<17}{'steps':>6}{'mean':>8}{'sd':>8}  per seed")
        for model in dict.fromkeys(m for m, _ in sorted(last, key=lambda k: k[1])):
            finals = [r for (m, _), r in sorted(last.items()) if m == model]
            vals = [r["value"] for r in finals]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"{model:<17}{finals[0]['steps']:>6}{statistics.mean(vals):>8.3f}{sd:>8.3f}  "
                  f"{' '.join(f'{v:.3f}' for v in vals)}")
        plot(rows, json_path.with_name(f"plt_quality_{task_name}_{variant}.png"),
             f"{task_name}, {variant}, d={any_row['hidden']}, window {any_row['window']}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("task", help="part 1: the synthetic multi-hop task")
    t.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(LOOPS))
    t.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    t.add_argument("--layers", type=int, default=1, help="L: the shared block's layers")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--window", type=int, default=16)
    t.add_argument("--kind", choices=["functions", "chains"], default="functions")
    t.add_argument("--functions", type=int, default=8)
    t.add_argument("--values", type=int, default=8)
    t.add_argument("--hops", type=int, default=5)
    t.add_argument("--chains", type=int, default=3)
    t.add_argument("--digits", type=int, default=2, help="answer tokens")
    t.add_argument("--variables", type=int, default=48, help="variable names")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--train-examples", type=int, default=100_000)
    t.add_argument("--test-examples", type=int, default=500)
    t.add_argument("--nproc", type=int, default=1)
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
