"""Quality of dense vs fine_grained (CDAC) vs bigmac (DCCA), at equal tokens and at equal wall time.

    python scripts/compare_moe.py --seeds 1,2,3                     # equal tokens (~30 min)
    python scripts/compare_moe.py --seeds 1,2,3 --equal-time-from docs/results/bench_cluster.json
    python scripts/compare_moe.py --preset small --variants bigmac,bigmac+fp8   # wire formats

Each variant trains through the main job (``plt_train.train`` under torchrun, two processes,
MoE experts over two expert-parallel ranks) with the same seed, data order and optimizer.
Every setting is pinned here (``PRESETS``, ``RECIPE``): a change of the project's defaults does
not change what this measures.  The MoE variants use the paper's recipe (64 experts, top-k,
r = 0.25, aux loss 1e-3, capacity factor 1.2); the dense baseline's SwiGLU width is
``top_k * r * h``, so its MLP has the same ACTIVE parameters as the routed experts (BigMac's
descend/ascend projections, 2 r h^2 per layer, and the routers come on top, as in the paper).

Presets: ``bench`` (default) is the model of ``scripts/bench_cluster.py`` (4 layers, h = 512, so
r*h = 128: not the r*h = 64 bottleneck of h = 256, which the paper's h = 2048 never has; a
1024-token BPE; 4096 tokens per step): its step times under the emulated network apply as they
are.  ``small`` is the earlier 4-layer h = 256 comparison (8192-token BPE).

Equal wall time.  The network does not change the numbers (``tests/cluster``: a run across
shaped links gives the losses of the same run on loopback), only how long each step takes.  So
a run at equal wall time under the emulated network is this run on loopback, stopped at the
step it would have reached in the time budget: ``--equal-time-from`` reads each layer's
measured step time at ``--link-mbit`` (default: the lowest rate measured, where the all-to-all
dominates) for EP = 2 and this top-k from ``scripts/bench_cluster.py``'s JSON; the budget is
what fine_grained needs for ``--steps`` steps, and each variant trains for as many steps as
fit in it.  The learning rate is constant after warmup (``RECIPE``) so that one run gives the
validation loss at every budget, with no schedule favouring one length; losses at the budget
are interpolated linearly between the two neighbouring evaluations.

Output: one JSON record per variant and seed under ``--out`` (validation curves against
tokens and against emulated seconds, parameters, wall time, all-to-all MB per step), a summary
per variant (mean and sample standard deviation over seeds, at equal tokens and at equal time),
validation curves (PNG: mean with min-max band), and the tables, printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("dense", "fine_grained", "bigmac")
PRESETS = {
    "bench": {"model": "small", "model.num_layers": 4, "model.hidden_size": 512,
              "model.num_attention_heads": 8, "model.num_query_groups": None,
              "model.seq_length": 256, "data.vocab_size": 1024, "model.vocab_size": None,
              "train.micro_batch_size": 4, "train.global_batch_size": 16},
    # One GPU (the project's GPU script): r*h = 256, 32k tokens per step, bf16 by default.
    "gpu": {"model": "small", "model.num_layers": 8, "model.hidden_size": 1024,
            "model.num_attention_heads": 16, "model.num_query_groups": None,
            "model.seq_length": 1024, "data.vocab_size": 8192, "model.vocab_size": None,
            "train.micro_batch_size": 8, "train.global_batch_size": 32,
            "train.precision": "auto"},
    "small": {"model": "small", "model.num_layers": 4, "model.hidden_size": 256,
              "model.num_attention_heads": 4, "model.num_query_groups": None,
              "model.seq_length": 256, "data.vocab_size": 8192, "model.vocab_size": None,
              "train.micro_batch_size": 8, "train.global_batch_size": 16},
}
RECIPE = {"optim.lr": 1e-3, "optim.min_lr": 1e-3, "optim.decay_style": "constant",
          "optim.warmup_steps": 20, "optim.weight_decay": 0.1, "optim.beta1": 0.9,
          "optim.beta2": 0.95, "optim.clip_grad": 1.0, "model.attention_dropout": 0.0,
          "model.hidden_dropout": 0.0, "train.precision": "fp32", "logging.wandb": False,
          "train.log_interval": 1, "checkpoint.save_interval": 0,
          "checkpoint.save_at_end": False, "checkpoint.resume": False, "sample.prompt": None,
          "parallel": "data"}
MOE = {"model.moe.num_experts": 64, "model.moe.ratio": 0.25, "model.moe.capacity_factor": 1.2,
       "model.moe.aux_loss_coeff": 1e-3}
NPROC = 2  # processes = expert-parallel size of the MoE runs (bench_cluster's EP=2)


def log(msg: str) -> None:
    print(f"[compare_moe] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="outputs/compare_moe")
    p.add_argument("--out", default=None, help="JSON (default: OUT_DIR/compare_moe.json)")
    p.add_argument("--plot", default=None, help="PNG (default: OUT_DIR/compare_moe.png)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=100, help="equal-token budget, in steps")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--equal-time-from", default=None,
                   help="bench_cluster JSON: train each variant for fine_grained's wall time")
    p.add_argument("--equal-time-variants", default=None,
                   help="only these variants also train to the time budget (default: all)")
    p.add_argument("--link-mbit", type=float, default=None,
                   help="the rate whose step times set the budget (default: the lowest)")
    p.add_argument("--nproc", type=int, default=NPROC,
                   help="processes (and expert-parallel size); 1 on one GPU")
    p.add_argument("--extra", default="", help="more Hydra overrides for every run")
    return p.parse_args(argv)


def split_variant(variant: str) -> tuple:
    """``bigmac+fp8`` -> ("bigmac", "fp8"); a plain layer keeps the default format."""
    layer, _, wire_format = variant.partition("+")
    return layer, wire_format or "native"


def dense_ffn(args) -> int:
    h = PRESETS[args.preset]["model.hidden_size"]
    return int(round(args.topk * MOE["model.moe.ratio"] * h))


def parameters(variant: str, args) -> dict:
    """Total and active parameters (no biases, untied embeddings, GQA as configured)."""
    from plt_train.config.schema import ModelConfig, MoEConfig
    from plt_train.models.moe.flops import moe_layer_parameters

    layer = split_variant(variant)[0]
    preset = PRESETS[args.preset]
    h, L, a = preset["model.hidden_size"], preset["model.num_layers"], \
        preset["model.num_attention_heads"]
    vocab = preset["data.vocab_size"]  # the corpus BPE's sizes are multiples of 128: no padding
    attention = 4 * h * h
    common = 2 * vocab * h + L * (attention + 2 * h) + h
    if layer == "dense":
        mlp = 3 * h * dense_ffn(args)
        return {"total": common + L * mlp, "active": common + L * mlp}
    model = ModelConfig(hidden_size=h, moe=MoEConfig(
        layer=layer, num_experts=MOE["model.moe.num_experts"], top_k=args.topk,
        ratio=MOE["model.moe.ratio"]))
    mlp = moe_layer_parameters(model)
    return {"total": common + L * mlp["total"], "active": common + L * mlp["active"]}


def overrides(variant: str, seed: int, steps: int, args, run_dir: Path) -> list[str]:
    layer, wire_format = split_variant(variant)
    settings = {**RECIPE, **PRESETS[args.preset], "run_dir": str(run_dir),
                "name": f"compare_moe_{variant.replace('+', '_')}", "train.seed": seed,
                "train.steps": steps, "train.eval_interval": args.eval_interval,
                "train.eval_iters": args.eval_iters, "moe": layer}
    if layer == "dense":
        settings.update({"model.ffn_hidden_size": dense_ffn(args), "parallel.expert": 1})
    else:
        settings.update({**MOE, "model.moe.top_k": args.topk, "parallel.expert": args.nproc,
                         "model.moe.wire_format": wire_format})
    out = []
    for key, value in settings.items():
        value = "null" if value is None else value
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out + [x for x in args.extra.split() if x]


def tokens_per_step(args) -> int:
    preset = PRESETS[args.preset]
    return preset["train.global_batch_size"] * preset["model.seq_length"]


def equal_time_steps(bench: list[dict], variants: list[str], args) -> tuple[dict, dict, float]:
    """Steps per variant in fine_grained's time for ``args.steps`` steps, from the measured step
    times of ``bench`` (bench_cluster records, EP = 2, this top-k) at the link rate; also the
    step times used and the rate."""
    want = {k: v for k, v in PRESETS[args.preset].items() if k.startswith(("model.", "data."))
            or k.startswith("train.micro")}
    rows = [r for r in bench if r.get("layer") and r["ep"] == args.nproc
            and r["topk"] in (args.topk, None) and r["link_mbit"] is not None]
    rate = args.link_mbit if args.link_mbit is not None else min(
        r["link_mbit"] for r in rows if r["topk"] == args.topk)
    step_ms = {}
    for variant in variants:
        layer = split_variant(variant)[0]
        match = [r for r in rows if r["layer"] == layer and r["link_mbit"] == rate
                 and (r["topk"] == args.topk or layer == "dense")]
        if not match:
            raise SystemExit(f"[compare_moe] the bench JSON has no {layer} run at EP={args.nproc} "
                             f"top-{args.topk} and {rate:g} Mbit/s")
        got = dict(o.split("=", 1) for o in match[0]["overrides"])
        for key, value in want.items():
            if got.get(key) != ("null" if value is None else str(value)):
                raise SystemExit(f"[compare_moe] the bench ran {key}={got.get(key)}, this "
                                 f"preset has {value}: its step times do not apply")
        step_ms[variant] = match[0]["step_ms"]
    if "fine_grained" not in step_ms:
        raise SystemExit("[compare_moe] equal time needs fine_grained among the variants")
    budget_ms = args.steps * step_ms["fine_grained"]
    return {v: int(budget_ms / ms + 1e-6) for v, ms in step_ms.items()}, step_ms, rate


def loss_at(curve: list[dict], step: float) -> float:
    """Validation loss at ``step``, linear between the two evaluations around it."""
    pts = sorted((p["step"], p["loss"]) for p in curve)
    if step <= pts[0][0]:
        return pts[0][1]
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    return pts[-1][1]


def train(variant: str, seed: int, steps: int, args, out_dir: Path) -> dict:
    tag = f"{variant.replace('+', '_')}_seed{seed}"
    run_dir = out_dir / tag
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "plt_train.train",
           *overrides(variant, seed, steps, args, run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    log(f"{tag}: {steps} steps")
    start = time.perf_counter()
    with open(out_dir / f"{tag}.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{tag} failed (rc {rc}): see {out_dir / f'{tag}.log'}")
    from plt_train.training.loggers import read_metrics

    tr, va = read_metrics(run_dir, "train"), read_metrics(run_dir, "valid")
    per_step = tokens_per_step(args)
    steady = [r["tokens_per_s"] for r in tr[len(tr) // 5:] if "tokens_per_s" in r]
    return {
        "variant": variant, "seed": seed, "steps": steps, "tokens": steps * per_step,
        "valid": [{"step": r["step"], "tokens": r["step"] * per_step, "loss": r["loss"]}
                  for r in va],
        "train_loss": [r["loss"] for r in tr],
        "wall_s": wall, "tokens_per_s": statistics.mean(steady) if steady else None,
        "a2a_MB_per_step": statistics.mean(r.get("a2a_MB", 0.0) for r in tr) if tr else 0.0,
        "load_balancing_loss_final": tr[-1].get("load_balancing_loss") if tr else None,
        "params": parameters(variant, args),
        "overrides": overrides(variant, seed, steps, args, run_dir),
    }


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(records: list[dict], args, time_steps: dict | None, step_ms: dict | None,
              rate) -> list[dict]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        row = {"kind": "summary", "variant": variant, "seeds": [r["seed"] for r in runs],
               "equal_tokens": {"steps": args.steps, "tokens": args.steps * tokens_per_step(args),
                                "valid_loss": spread([loss_at(r["valid"], args.steps)
                                                      for r in runs])},
               "params": runs[0]["params"]}
        if time_steps and variant in time_steps:
            steps = time_steps[variant]
            row["equal_time"] = {
                "link_mbit": rate, "budget_s": args.steps * step_ms["fine_grained"] / 1e3,
                "step_ms": step_ms[variant], "steps": steps,
                "tokens": steps * tokens_per_step(args),
                "valid_loss": spread([loss_at(r["valid"], steps) for r in runs])}
        out.append(row)
    return out


def plot(records: list[dict], summary: list[dict], path: Path, title: str,
         step_ms: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if step_ms else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    for s in summary:
        runs = [r for r in records if r["variant"] == s["variant"]]
        steps = sorted({p["step"] for r in runs for p in r["valid"]})
        curves = [[loss_at(r["valid"], st) for st in steps] for r in runs]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(steps))]
        lo = [min(c[i] for c in curves) for i in range(len(steps))]
        hi = [max(c[i] for c in curves) for i in range(len(steps))]
        label = (f"{s['variant']} ({s['params']['active'] / 1e6:.1f}M active / "
                 f"{s['params']['total'] / 1e6:.1f}M), {len(runs)} seeds")
        xs_sets = [[st * records[0]["tokens"] / records[0]["steps"] / 1e6 for st in steps]]
        if step_ms and s["variant"] in step_ms:
            xs_sets.append([st * step_ms[s["variant"]] / 1e3 for st in steps])
        color = f"C{[x['variant'] for x in summary].index(s['variant'])}"
        for ax, xs in zip(axes[0], xs_sets):
            ax.plot(xs, mean, marker=".", label=label, color=color)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
    axes[0][0].set_xlabel("training tokens (M)")
    if step_ms:
        timed = next(x["equal_time"] for x in summary if "equal_time" in x)
        budget = timed["budget_s"]
        axes[0][1].axvline(budget, color="grey", ls="--", lw=1)
        axes[0][1].set_xlabel(f"emulated wall time at {timed['link_mbit']:g} Mbit/s (s)")
        axes[0][1].set_xlim(0, budget * 1.05)
    for ax in axes[0]:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or out_dir / "compare_moe.json")
    png = Path(args.plot or out_dir / "compare_moe.png")
    variants = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    time_steps = step_ms = rate = None
    if args.equal_time_from:
        bench = json.loads(Path(args.equal_time_from).read_text())
        timed = args.equal_time_variants.split(",") if args.equal_time_variants else variants
        time_steps, step_ms, rate = equal_time_steps(bench, timed, args)
        log(f"equal time at {rate:g} Mbit/s: step ms {step_ms} -> steps {time_steps}")
    records: list[dict] = []
    for seed in seeds:  # seed-major: a partial run still has every variant for its seeds
        for variant in variants:
            steps = max(args.steps, (time_steps or {}).get(variant, 0))
            records.append(train(variant, seed, steps, args, out_dir))
            summary = summarize(records, args, time_steps, step_ms, rate)
            out.write_text(json.dumps(records + summary, indent=1))
    preset = PRESETS[args.preset]
    title = (f"{args.preset}: {preset['model.num_layers']} layers, h={preset['model.hidden_size']},"
             f" {tokens_per_step(args)} tokens/step, constant lr {RECIPE['optim.lr']:g}; MoE: "
             f"{MOE['model.moe.num_experts']} experts top-{args.topk} "
             f"r={MOE['model.moe.ratio']}, EP={args.nproc}")
    plot(records, summary, png, title, step_ms)
    print(f"\n== {title}; seeds {seeds}")
    print(f"{'variant':13} {'params':>8} {'active':>8} | equal tokens ({args.steps} steps): "
          f"val mean (sd) [min, max]" + (" | equal time: steps, val mean (sd)" if time_steps
                                         else ""))
    for s in summary:
        e = s["equal_tokens"]["valid_loss"]
        line = (f"{s['variant']:13} {s['params']['total'] / 1e6:7.2f}M "
                f"{s['params']['active'] / 1e6:7.2f}M | {e['mean']:.4f} ({e['sd']:.4f}) "
                f"[{e['min']:.4f}, {e['max']:.4f}]")
        if "equal_time" in s:
            t = s["equal_time"]
            line += (f" | {t['steps']:4d}, {t['valid_loss']['mean']:.4f} "
                     f"({t['valid_loss']['sd']:.4f})")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
