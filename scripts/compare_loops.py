"""Quality run: vanilla vs looped-2 vs PLT-2 at equal parameters and equal tokens.

    python scripts/compare_loops.py                    # CPU default: ~10 minutes on 2 cores
    python scripts/compare_loops.py --steps 2000 --set model.hidden_size=512   # a pinned key, replaced

Every model has the same shared block (so the same parameter count, give or take PLT's
G-SWA gates) and sees the same batches; looped-2 and PLT-2 spend twice the compute of vanilla
per token.  Each run is ``plt_train.train`` under torchrun; the validation loss curves from
each run's ``metrics.jsonl`` go to a JSON file and a PNG plot, and a table is printed last.

One seed and one budget: a quick look.  The evidence for PLT's accuracy claim (several seeds,
the spread, the ablations, the decode latency beside the loss) is ``scripts/plt_quality.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from plt_quality import with_overrides  # noqa: E402

MODELS = {
    "vanilla": ["model.name=vanilla"],
    # As measured in docs/benchmarks.md: loop 2 fed the normed state (pinned below), which
    # leaves its update ~1 % of its input at init and this baseline level with one pass.
    "looped-2": ["model.name=looped", "model.loops=2"],
    # The looped baseline to compare with (the looped model's default): loop 2 continues
    # loop 1's residual stream.
    "looped-2-raw": ["model.name=looped", "model.loops=2", "model.loop.norm_between_loops=false"],
    "plt-2": ["model.name=plt", "model.loops=2"],
    # Optional variants (--models): gradient into loop 1's K/V; the input-projection gate.
    "plt-2-grad-kv": ["model.name=plt", "model.loops=2", "model.loop.detach_kv=false"],
    "plt-2-input-gate": ["model.name=plt", "model.loops=2", "model.loop.gate=input"],
    # The ablation chain looped -> +CLP -> +shared KV -> +G-SWA (= plt-2):
    "clp-2": ["model.name=plt", "model.loops=2", "model.loop.shared_kv=false"],
    "clp-2-shared-kv": ["model.name=plt", "model.loops=2", "model.loop.gswa=false"],
}
DEFAULT_MODELS = ["vanilla", "looped-2", "looped-2-raw", "plt-2"]
# CPU default: 2 layers of d=256 on 256-token sequences; PLT's window 64 covers a quarter.
# Everything the comparison relies on is pinned (the default config is the flagship PLT-2 with
# BigMac layers at EP=2: an unpinned run once measured BigMac here without saying so).
DEFAULT_SET = ["model=small", "moe=dense", "parallel=data", "model.tie_embeddings=false",
               "model.loop.window=64", "model.loop.gate=query", "model.loop.gswa=true",
               "model.loop.detach_kv=true", "model.loop.shared_kv=true",
               "model.loop.emb_scale=1.0", "model.loop.hidden_scale=1.0",
               "model.loop.norm_between_loops=true", "model.attention_dropout=0.0",
               "model.hidden_dropout=0.0", "optim.lr=3e-3", "optim.min_lr=3e-4",
               "optim.decay_style=cosine", "train.precision=fp32", "model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=4",
               "model.seq_length=256", "train.micro_batch_size=8", "train.global_batch_size=16",
               "train.eval_interval=25", "train.eval_iters=2", "optim.warmup_steps=15",
               "logging.wandb=false", "checkpoint.save_at_end=false"]


def run(name: str, overrides: list, out: Path, nproc: int, steps: int) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "plt_train.train", f"run_dir={run_dir}",
           f"name=compare_{name}", f"train.steps={steps}", "checkpoint.resume=false",
           *with_overrides(DEFAULT_SET, overrides)]
    print(f"[compare_loops] {name}: {' '.join(cmd[6:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("step ") and (" | loss " in line) and line.split("/")[0].endswith(
                ("25", "50", "75", "00")):
            print(f"  {name}: {line}", flush=True)
    if proc.returncode:
        print(proc.stdout[-4000:])
        raise SystemExit(f"{name} failed ({proc.returncode})")
    from plt_train.training.loggers import read_metrics

    valid = [(r["step"], r["loss"]) for r in read_metrics(run_dir, "valid")]
    train = read_metrics(run_dir, "train")
    params = next((int(x.split("params(this rank)=")[1].split()[0].replace(",", ""))
                   for x in proc.stdout.splitlines() if "params(this rank)=" in x), None)
    return {"model": name, "valid": valid, "final_valid_loss": valid[-1][1],
            "final_train_loss": train[-1]["loss"], "params_per_rank": params,
            "tokens_per_s": train[-1].get("tokens_per_s"), "wall_s": round(wall, 1)}


def plot(records: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        steps, losses = zip(*r["valid"])
        ax.plot(steps, losses, marker="o", label=f"{r['model']} ({r['final_valid_loss']:.3f})")
    ax.set_xlabel("optimizer step (equal tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("vanilla vs looped-2 vs PLT-2, equal parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "compare_loops")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    ap.add_argument("--set", nargs="*", default=[],
                    help="Hydra overrides for every run (a pinned key given here replaces the pin)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run(m, MODELS[m] + args.set, args.out, args.nproc, args.steps)
               for m in args.models]
    (args.out / "compare_loops.json").write_text(json.dumps(records, indent=2))
    plot(records, args.out / "compare_loops.png")
    print(f"\n{'model':12} {'params/rank':>12} {'final valid':>12} {'final train':>12} "
          f"{'tok/s':>8} {'wall s':>7}")
    for r in records:
        print(f"{r['model']:12} {r['params_per_rank'] or 0:>12,} {r['final_valid_loss']:>12.4f} "
              f"{r['final_train_loss']:>12.4f} {r['tokens_per_s'] or 0:>8.0f} {r['wall_s']:>7.1f}")
    print(f"JSON and plot in {args.out}")


if __name__ == "__main__":
    main()
