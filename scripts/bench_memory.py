"""Activation memory per micro-batch, measured, beside ``plt-dryrun``'s estimate.

    python scripts/bench_memory.py                    # CPU, one process, ~1 min
    python scripts/bench_memory.py --tiny             # seconds (the CI test)

For each model (gpt, gpt with BigMac MoE layers, looped-2, PLT-2, PLT-2 with BigMac) and each
``model.recompute`` mode (none; selective: core_attn; core_attn + mlp/moe; core_attn +
layernorm + mlp/moe; full), one training-mode forward pass of one micro-batch in fp32, with autograd's saved-tensor
hooks counting every byte kept for the backward pass (``plt_train.models.memory``: each
storage once, weights left out).  Beside it, the activation bytes per micro-batch that
``plt-dryrun --fp32 --device cpu`` prints for the same config
(``plt_train.models.activation_memory``), and their ratio.  PLT's later loops run the fused G-SWA kernel (``model.loop.kernel=triton``;
Triton's interpreter on CPU), the path a GPU takes, so the estimate describes what a GPU
run keeps.

Every setting it relies on is pinned below (``SHAPE``, ``MODELS``, ``MODES``), so a change of
the defaults never changes what it measures.  Outputs: a table (printed last), ``--out`` JSON
(a list of records: model, mode, measured_bytes, estimate_bytes, ratio, ...) and ``--plot``
PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Without a GPU the fused G-SWA kernel runs in Triton's interpreter (read at kernel import).
os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 4096  # tokenizer vocabulary (a multiple of 128: no padding)
SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
             seq_length=256, micro_batch=2)
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            seq_length=64, micro_batch=2)
BIGMAC = ["moe=bigmac", "model.moe.num_experts=16", "model.moe.top_k=4",
          "model.moe.capacity_factor=null"]
MODELS = {
    "gpt": ["model.name=gpt", "moe=dense"],
    "gpt-bigmac": ["model.name=gpt"] + BIGMAC,
    "looped-2": ["model.name=looped", "model.loops=2", "moe=dense"],
    "plt-2": ["model.name=plt", "model.loops=2", "moe=dense"],
    "plt-2-bigmac": ["model.name=plt", "model.loops=2"] + BIGMAC,
}
MODES = {
    "none": ["model.recompute.granularity=none"],
    "core_attn": ["model.recompute.granularity=selective", "model.recompute.modules=[core_attn]"],
    "selective": ["model.recompute.granularity=selective",
                  "model.recompute.modules=[core_attn,{mlp}]"],
    "selective+ln": ["model.recompute.granularity=selective",
                     "model.recompute.modules=[core_attn,layernorm,{mlp}]"],
    "full": ["model.recompute.granularity=full"],
}
PINNED = ["experiment=debug", "parallel=data", "model.hidden_dropout=0.0",
          "model.attention_dropout=0.0", "model.tie_embeddings=false",
          "model.loop.window=64", "model.loop.kernel=triton", "model.loop.gate=query",
          "model.loop.shared_kv=true", "model.loop.gswa=true", "model.loop.detach_kv=true",
          "model.loop.norm_between_loops=true", "model.recompute.num_layers=null",
          "model.moe.ratio=0.25", "model.moe.num_shared_experts=0",
          "model.moe.activation=swiglu", "model.moe.dcca_kernel=torch"]


def log(msg: str) -> None:
    print(f"[bench_memory] {msg}", flush=True)


def config(model: str, mode: str, shape: dict):
    from plt_train.config.store import compose_config

    mlp = "moe" if any("bigmac" in a for a in MODELS[model]) else "mlp"
    sizes = [f"model.{k}={v}" for k, v in shape.items() if k != "micro_batch"]
    return compose_config(
        PINNED + sizes + MODELS[model] + [a.replace("{mlp}", mlp) for a in MODES[mode]]
        + [f"train.micro_batch_size={shape['micro_batch']}",
           f"train.global_batch_size={shape['micro_batch']}"])


def measure(cfg, dev) -> int:
    """Bytes saved for backward by one training forward of one micro-batch."""
    import torch

    from plt_train.models import build_model, validate
    from plt_train.models.memory import saved_activation_bytes
    from plt_train.runtime.device import megatron_device_kwargs

    validate(cfg, 1)
    chunks, _, _ = build_model(cfg.model, cfg.parallel, VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 1, dev.device)
    model = chunks[0].train()
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    nbytes, _ = saved_activation_bytes(
        lambda: model(tokens, torch.arange(s).repeat(b, 1), None, labels=labels),
        list(model.parameters()))
    return nbytes


def run(args) -> list[dict]:
    from plt_train.models.plan import plan
    from plt_train.runtime import detect_device, destroy_distributed, init_distributed, set_seed

    dev = detect_device()
    init_distributed(dev)
    set_seed(0)
    shape = TINY if args.tiny else SHAPE
    records = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            cfg = config(model, mode, shape)
            start = time.perf_counter()
            measured = measure(cfg, dev)
            estimate = plan(cfg, 1, VOCAB, bf16=False, device="cpu").activation_bytes
            records.append(dict(
                model=model, mode=mode, measured_bytes=measured, estimate_bytes=int(estimate),
                ratio=estimate / measured, seconds=round(time.perf_counter() - start, 2),
                **shape, vocab=VOCAB, dtype="fp32", device=f"CPU ({platform.machine()})",
                date=time.strftime("%Y-%m-%d")))
            log(f"{model:>13} {mode:>12}: measured {measured / 2**20:8.2f} MiB, "
                f"estimate {estimate / 2**20:8.2f} MiB ({estimate / measured:.3f})")
    destroy_distributed()
    return records


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['mode']}" for r in records]
    x = range(len(records))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(records)), 4.5))
    ax.bar([i - 0.2 for i in x], [r["measured_bytes"] / 2**20 for r in records], 0.4,
           label="measured (saved-tensor hooks)")
    ax.bar([i + 0.2 for i in x], [r["estimate_bytes"] / 2**20 for r in records], 0.4,
           label="plt-dryrun estimate")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.set_ylabel("activation MiB per micro-batch (fp32)")
    ax.set_title("Activation memory by model and recompute mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    rows = [f"{'model':>13} {'mode':>12} {'measured MiB':>13} {'estimate MiB':>13} {'est/meas':>9}"]
    for r in records:
        rows.append(f"{r['model']:>13} {r['mode']:>12} {r['measured_bytes'] / 2**20:13.2f} "
                    f"{r['estimate_bytes'] / 2**20:13.2f} {r['ratio']:9.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (seconds)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="bench_memory.json")
    p.add_argument("--plot", default="bench_memory.png", help="'' for no plot")
    args = p.parse_args(argv)
    records = run(args)
    Path(args.out).write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, Path(args.plot))
    print(f"\n== {records[0]['device']}, {records[0]['date']}: fp32, seq "
          f"{records[0]['seq_length']} x micro-batch {records[0]['micro_batch']}, hidden "
          f"{records[0]['hidden_size']}, {records[0]['num_layers']} layers")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
