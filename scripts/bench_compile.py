"""Compiled transformer layers (``model.compile``): graph breaks, and compiled against eager.

    python scripts/bench_compile.py             # CPU, one process, a few minutes
    python scripts/bench_compile.py --tiny      # fewer models and steps (the CI test)

For each model (gpt; looped-2; PLT-2 through the reference and through the fused G-SWA
kernel; fine-grained and BigMac MoE layers, BigMac also with the fused DCCA kernels):

* **graph breaks per layer forward**, counted with ``torch._dynamo.explain`` on the first
  layer (for looped models in every loop; the worst loop is reported), each break named
  (``models.compile.MOE_HOST_SYNCS``) or, if unnamed, its reason: traced through, and as
  ``compile_layers`` compiles it (the MoE MLP kept eager: one break at its call);
* **backward**: AOTAutograd compiles one backward graph per forward graph (the joint graphs
  it compiled in a training step are counted), so a backward has no breaks of its own;
* **compiled against eager** over one training step (inductor; its C++ backend on CPU): the
  largest relative gradient difference, the first compiled step's time (compilation) and the
  median step time of each after warm-up.  CPU step times of a tiny model measure dispatch
  overhead more than kernels: they show that compiled layers run, not what a GPU gains.

Triton kernels run in Triton's interpreter without a GPU (as the tests do).  Every setting it
relies on is pinned below.  Outputs: a table (printed last), ``--out`` JSON (a list of
records) and ``--plot`` PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel module is imported

VOCAB = 512
SHAPE = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
             seq_length=128, micro_batch=2)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            seq_length=32, micro_batch=2)
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.capacity_factor=null"]
MODELS = {
    "gpt": ["model.name=gpt", "moe=dense"],
    "looped-2": ["model.name=looped", "model.loops=2", "moe=dense"],
    "plt-2": ["model.name=plt", "model.loops=2", "moe=dense", "model.loop.kernel=torch"],
    "plt-2-kernel": ["model.name=plt", "model.loops=2", "moe=dense",
                     "model.loop.kernel=triton"],
    "fine_grained": ["model.name=gpt", "moe=fine_grained"] + MOE,
    "bigmac": ["model.name=gpt", "moe=bigmac", "model.moe.dcca_kernel=torch"] + MOE,
    "bigmac-kernels": ["model.name=gpt", "moe=bigmac", "model.moe.dcca_kernel=triton"] + MOE,
}
TINY_MODELS = ["gpt", "plt-2-kernel", "bigmac-kernels"]
PINNED = ["experiment=debug", "parallel=data", "model.hidden_dropout=0.0",
          "model.attention_dropout=0.0", "model.tie_embeddings=false", "model.loop.window=16",
          "model.loop.gate=query", "model.loop.shared_kv=true", "model.loop.gswa=true",
          "model.loop.detach_kv=true", "model.loop.norm_between_loops=true",
          "model.recompute.granularity=none", "model.moe.ratio=0.25",
          "model.moe.num_shared_experts=0", "model.moe.activation=swiglu",
          "model.moe.expert_gemm=auto", "model.swiglu_fusion=off", "model.compile=false"]


def log(msg: str) -> None:
    print(f"[bench_compile] {msg}", flush=True)


def config(model: str, shape: dict):
    from plt_train.config.store import compose_config

    sizes = [f"model.{k}={v}" for k, v in shape.items() if k != "micro_batch"]
    return compose_config(PINNED + sizes + MODELS[model] + [
        f"train.micro_batch_size={shape['micro_batch']}",
        f"train.global_batch_size={shape['micro_batch']}"])


def build(cfg, dev):
    import torch

    from plt_train.models import build_model
    from plt_train.runtime.device import megatron_device_kwargs

    chunks, _, _ = build_model(cfg.model, cfg.parallel, VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 1, dev.device)
    return chunks[0].train()


def layer_breaks(model, cfg) -> tuple[int, list]:
    """The worst loop's (graphs, breaks) of the first layer's forward."""
    import torch

    from plt_train.models.compile import graph_breaks

    layer = model.decoder.layers[0]
    x = torch.randn(cfg.model.seq_length, cfg.train.micro_batch_size, cfg.model.hidden_size,
                    requires_grad=True)
    rope = model.rotary_pos_emb(cfg.model.seq_length)

    def forward(h):
        return layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rope)[0]

    worst = (0, [])
    for loop in range(getattr(model, "loops", 1)):
        if loop:  # loop 1's K/V for this loop, queued by an eager pass
            model.loop_state.begin(0)
            forward(x)
        if hasattr(model, "loop_state"):
            model.loop_state.begin(loop)
        worst = max(worst, graph_breaks(forward, x), key=lambda r: (len(r[1]), r[0]))
    return worst


def train_step(model, cfg):
    import torch

    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    model(tokens, torch.arange(s)[None], None, labels=labels).float().mean().backward()
    seconds = time.perf_counter() - start
    return seconds, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def timed(model, cfg, steps: int) -> tuple[float, dict, float]:
    """(first step seconds, first step's gradients, median later step seconds)."""
    first, grads = train_step(model, cfg)
    later = [train_step(model, cfg)[0] for _ in range(steps)]
    return first, grads, statistics.median(later)


def run(args) -> list[dict]:
    import torch
    from torch._dynamo.utils import counters

    from plt_train.models.compile import compile_layers, keep_moe_eager
    from plt_train.runtime import detect_device, destroy_distributed, init_distributed, set_seed

    dev = detect_device()
    init_distributed(dev)
    set_seed(0)
    shape = TINY if args.tiny else SHAPE
    records = []
    for name in args.models.split(","):
        cfg = config(name, shape)
        traced = build(cfg, dev)
        graphs, breaks = layer_breaks(traced, cfg)
        keep_moe_eager(traced.decoder.layers[0])  # as compile_layers does
        compiled_graphs, compiled_breaks = layer_breaks(traced, cfg)
        _, want, eager_s = timed(build(cfg, dev), cfg, args.steps)
        model = build(cfg, dev)
        torch._dynamo.reset()
        counters.clear()
        compile_layers([model], cfg.model, dev.device)
        compile_s, got, compiled_s = timed(model, cfg, args.steps)
        err = max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-12))
                  for k in want)
        named = sorted({b.host_sync or f"UNNAMED: {b.reason}" for b in breaks})
        records.append(dict(
            model=name, layer_graphs=graphs, layer_breaks=len(breaks), breaks=named,
            compiled_layer_graphs=compiled_graphs, compiled_layer_breaks=len(compiled_breaks),
            step_forward_graphs=counters["stats"]["unique_graphs"],
            step_backward_graphs=counters["aot_autograd"]["ok"], max_grad_rel_err=err,
            first_compiled_step_s=round(compile_s, 2), eager_step_ms=round(eager_s * 1e3, 2),
            compiled_step_ms=round(compiled_s * 1e3, 2), **shape, vocab=VOCAB, dtype="fp32",
            device=f"CPU ({platform.machine()})", torch=torch.__version__,
            date=time.strftime("%Y-%m-%d")))
        log(f"{name:>15}: layer forward {graphs} graphs / {len(breaks)} breaks traced "
            f"through, {compiled_graphs} / {len(compiled_breaks)} as compiled; step "
            f"{records[-1]['step_forward_graphs']} forward / "
            f"{records[-1]['step_backward_graphs']} backward graphs; grad err {err:.1e}; "
            f"compile {compile_s:.1f} s; eager {eager_s * 1e3:.1f} ms, compiled "
            f"{compiled_s * 1e3:.1f} ms")
        torch._dynamo.reset()
    destroy_distributed()
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([i - 0.2 for i in range(len(records))], [r["layer_breaks"] for r in records], 0.4,
             label="traced through")
    left.bar([i + 0.2 for i in range(len(records))],
             [r["compiled_layer_breaks"] for r in records], 0.4, label="as compiled")
    left.set_xticks(list(range(len(records))), names)
    left.legend()
    left.set_ylabel("graph breaks per layer forward")
    left.set_title("Graph breaks (dense and PLT: 0)")
    x = range(len(records))
    right.bar([i - 0.2 for i in x], [r["eager_step_ms"] for r in records], 0.4, label="eager")
    right.bar([i + 0.2 for i in x], [r["compiled_step_ms"] for r in records], 0.4,
              label="compiled layers")
    right.set_xticks(list(x), names)
    right.set_ylabel("ms per training step (CPU, fp32)")
    right.set_title("Step time (CPU: dispatch-bound)")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    rows = [f"{'model':>15} {'traced':>13} {'compiled':>13} {'step fwd/bwd':>12} "
            f"{'grad err':>9} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11}",
            f"{'':>15} {'graphs/breaks':>13} {'graphs/breaks':>13} {'graphs':>12}"]
    for r in records:
        rows.append(f"{r['model']:>15} {r['layer_graphs']:6d} / {r['layer_breaks']:<4d} "
                    f"{r['compiled_layer_graphs']:6d} / {r['compiled_layer_breaks']:<4d} "
                    f"{r['step_forward_graphs']:>5d} / {r['step_backward_graphs']:<4d} "
                    f"{r['max_grad_rel_err']:9.1e} {r['first_compiled_step_s']:9.1f} "
                    f"{r['eager_step_ms']:9.1f} {r['compiled_step_ms']:11.1f}")
    for r in records:
        for b in r["breaks"]:
            rows.append(f"  {r['model']}: {b}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model, 3 models")
    p.add_argument("--models", default=None, help="comma-separated (default: all, or the "
                                                  "tiny set with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--out", default="bench_compile.json")
    p.add_argument("--plot", default="bench_compile.png", help="'' for no plot")
    args = p.parse_args(argv)
    args.models = args.models or ",".join(TINY_MODELS if args.tiny else MODELS)
    records = run(args)
    Path(args.out).write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, Path(args.plot))
    r = records[0]
    print(f"\n== {r['device']}, torch {r['torch']}, {r['date']}: fp32, seq {r['seq_length']} x "
          f"micro-batch {r['micro_batch']}, hidden {r['hidden_size']}, {r['num_layers']} layers")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
