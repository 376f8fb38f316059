"""Quality at equal tokens: dense vs fine_grained (CDAC) vs bigmac (DCCA) on the embedded corpus.

    python scripts/compare_moe.py --out-dir outputs/compare_moe          # ~10 min on 2 CPU cores
    python scripts/compare_moe.py --steps 20 --eval-interval 10 ...      # a quick look

Each variant trains through the main job (``plt_train.train`` under torchrun, subprocesses as
in tests/conftest.run_train) with the same seed, data order, optimizer and token budget, from
the ``small`` model (4 layers, d=256, seq 256).  The MoE variants use the paper's setting
(64 experts, top-8, r = 0.25, aux loss 1e-3, capacity factor 1.2) over ``--expert`` expert-
parallel ranks; the dense baseline's SwiGLU width is ``top_k * r * h`` so that its MLP has the
same ACTIVE parameters as the routed experts (BigMac's descend/ascend projections, 2 r h^2 per
layer, and the routers come on top, as in the paper).  Output: validation-loss curves against
tokens (PNG), one JSON record per variant (curves, parameters total/active, wall time,
tokens/s, all-to-all MB per step), and a table printed last.

A variant ``LAYER+FORMAT`` (e.g. ``bigmac+fp8``) runs LAYER with ``model.moe.wire_format=FORMAT``
(``plt_train/models/moe/wire.py``): the quality check of a lower-precision all-to-all,

    python scripts/compare_moe.py --variants bigmac,bigmac+bf16,bigmac+fp8
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
sys.path.insert(0, str(REPO))

VARIANTS = ("dense", "fine_grained", "bigmac")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="outputs/compare_moe")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="small", help="configs/model preset")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--expert", type=int, default=2, help="expert-parallel size of MoE runs")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--lr", type=float, default=None, help="optim.lr override (all variants)")
    p.add_argument("--extra", default="",
                   help="more Hydra overrides for every run, space-separated")
    return p.parse_args(argv)


def model_shape(preset: str) -> dict:
    import yaml
    return yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())


def split_variant(variant: str) -> tuple:
    """``bigmac+fp8`` -> ("bigmac", "fp8"); a plain layer keeps the default format."""
    layer, _, wire_format = variant.partition("+")
    return layer, wire_format or None


def parameters(variant: str, shape: dict, args, vocab: int) -> dict:
    """Total and active parameters (no biases, untied embeddings, GQA as configured)."""
    variant = split_variant(variant)[0]
    from plt_train.config.schema import ModelConfig, MoEConfig
    from plt_train.models.moe.flops import moe_layer_parameters

    h, L, a = shape["hidden_size"], shape["num_layers"], shape["num_attention_heads"]
    g, d = shape.get("num_query_groups") or a, h // a
    attention = h * (a + 2 * g) * d + a * d * h
    common = 2 * vocab * h + L * (attention + 2 * h) + h
    if variant == "dense":
        f = dense_ffn(args, h)
        return {"total": common + L * 3 * h * f, "active": common + L * 3 * h * f}
    model = ModelConfig(hidden_size=h, moe=MoEConfig(layer=variant, num_experts=args.experts,
                                                     top_k=args.topk, ratio=args.ratio))
    mlp = moe_layer_parameters(model)
    return {"total": common + L * mlp["total"], "active": common + L * mlp["active"]}


def dense_ffn(args, h: int) -> int:
    return int(round(args.topk * args.ratio * h))


def overrides(variant: str, args, run_dir: Path, shape: dict) -> list[str]:
    layer, wire_format = split_variant(variant)
    o = [f"run_dir={run_dir}", f"name=compare_moe_{variant.replace('+', '_')}",
         f"model={args.model}",
         "logging.wandb=false", f"train.steps={args.steps}",
         f"train.global_batch_size={args.global_batch}",
         f"train.micro_batch_size={args.micro_batch}",
         f"train.eval_interval={args.eval_interval}", f"train.eval_iters={args.eval_iters}",
         f"optim.warmup_steps={max(1, min(20, args.steps // 6))}",
         "checkpoint.save_at_end=false", "checkpoint.resume=false"]
    if args.lr is not None:
        o.append(f"optim.lr={args.lr}")
    if layer == "dense":
        o.append(f"model.ffn_hidden_size={dense_ffn(args, shape['hidden_size'])}")
    else:
        o += [f"moe={layer}", f"model.moe.num_experts={args.experts}",
              f"model.moe.top_k={args.topk}", f"model.moe.ratio={args.ratio}",
              f"parallel.expert={args.expert}"]
        if wire_format:
            o.append(f"model.moe.wire_format={wire_format}")
    return o + [x for x in args.extra.split() if x]


def train(variant: str, args, out_dir: Path, shape: dict) -> dict:
    run_dir = out_dir / variant.replace("+", "_")
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "plt_train.train",
           *overrides(variant, args, run_dir, shape)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    print(f"[compare_moe] {variant}: {' '.join(cmd[5:])}", flush=True)
    start = time.perf_counter()
    with open(out_dir / f"{variant}.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{variant} failed (rc {rc}): see {out_dir / f'{variant}.log'}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    tr = [r for r in rows if r["kind"] == "train"]
    va = [r for r in rows if r["kind"] == "valid"]
    tokens_per_step = args.global_batch * shape["seq_length"]
    steady = [r["tokens_per_s"] for r in tr[len(tr) // 5:] if "tokens_per_s" in r]
    return {
        "variant": variant, "steps": args.steps, "tokens": args.steps * tokens_per_step,
        "valid": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"]}
                  for r in va],
        "train_loss": [r["loss"] for r in tr],
        "final_valid_loss": va[-1]["loss"] if va else None,
        "wall_s": wall, "tokens_per_s": sum(steady) / len(steady) if steady else None,
        "a2a_MB_per_step": (sum(r.get("a2a_MB", 0.0) for r in tr) / len(tr)) if tr else 0.0,
        "load_balancing_loss_final": tr[-1].get("load_balancing_loss") if tr else None,
        "overrides": overrides(variant, args, run_dir, shape),
    }


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        xs = [p["tokens"] / 1e6 for p in r["valid"]]
        ax.plot(xs, [p["loss"] for p in r["valid"]], marker="o",
                label=f"{r['variant']} ({r['params']['active'] / 1e6:.2f}M active / "
                      f"{r['params']['total'] / 1e6:.1f}M)")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = model_shape(args.model)
    vocab = 8192  # the embedded corpus's BPE (a multiple of 128: no padding)
    records = []
    for variant in args.variants.split(","):
        rec = train(variant, args, out_dir, shape)
        rec["params"] = parameters(variant, shape, args, vocab)
        records.append(rec)
        print(f"[compare_moe] {variant}: final valid loss {rec['final_valid_loss']:.4f}, "
              f"{rec['wall_s']:.0f}s", flush=True)
    (out_dir / "compare_moe.json").write_text(json.dumps(records, indent=1))
    title = (f"{args.model} model, {args.steps} steps x {args.global_batch} x "
             f"{shape['seq_length']} tokens; MoE: {args.experts} experts top-{args.topk} "
             f"r={args.ratio}, EP={args.expert}")
    plot(records, out_dir / "compare_moe.png", title)
    print(f"\n== {title}")
    print(f"{'variant':13} {'params':>8} {'active':>8} {'final val':>9} {'best val':>9} "
          f"{'tok/s':>7} {'wall s':>6} {'a2a MB/step':>11}")
    for r in records:
        best = min(p["loss"] for p in r["valid"]) if r["valid"] else float("nan")
        print(f"{r['variant']:13} {r['params']['total'] / 1e6:7.2f}M "
              f"{r['params']['active'] / 1e6:7.2f}M {r['final_valid_loss']:9.4f} {best:9.4f} "
              f"{r['tokens_per_s'] or 0:7.0f} {r['wall_s']:6.0f} {r['a2a_MB_per_step']:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
