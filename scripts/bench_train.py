"""Training throughput benchmark: plt_train ("ours") against a plain-PyTorch GPT of the same shape.

    python scripts/bench_train.py                      # ~1B dense model, bf16, on one GPU
    python scripts/bench_train.py --tiny --steps 3     # CPU smoke run (seconds)

Variants (``--which``, default all three; ``plain_compiled`` is skipped on CPU unless named):

* ``ours``           plt_train's model, DDP wrapper, optimizer and ``train_step`` (megatron-core
                     schedule, fp32 main grads, fp32 master weights in the optimizer under bf16),
                     in-process on a one-rank process group.
* ``plain_eager``    ``scripts/plain_gpt.py`` with a hand-written loop: fused AdamW on CUDA,
                     grad clipping, same data, learning rate and weight decay rule.
* ``plain_compiled`` the same, ``torch.compile``-d (model forward + loss; backward by AOTAutograd).

Each variant: ``--warmup`` untimed steps, then ``--steps`` timed ones with the device synchronised
around every step; the MEDIAN step time gives tokens/s, TFLOP/s (our matmul FLOP count, the
model family's ``flops_per_sequence``: loops and MoE counted) and MFU (``peak_flops_per_second``).
Data is a fixed pool of random batches on the device (Zipf-distributed tokens, so the loss has
something to learn and the sanity check "loss decreased" means something); data loading is not
part of the measurement.  ``--set`` builds any model the main job can (PLT, BigMac, a kernel
choice), e.g. ``--which ours --set name=plt loops=2 loop.kernel=triton``.

The table is printed LAST so the tail of a remote run shows it; ``--out`` writes the records as
JSON and ``--plot`` a bar chart of tokens/s.  Exit status 1 if a variant failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from plain_gpt import PlainGPT, count_parameters  # noqa: E402
from plt_train.config.schema import (  # noqa: E402
    ModelConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig,
)

VARIANTS = ("ours", "plain_eager", "plain_compiled")
TINY = dict(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=128)
TINY_VOCAB, TINY_MICRO_BATCH = 1024, 2
FULL_MICRO_BATCH = 4
POOL_BATCHES = 8  # distinct random batches cycled through

PRECISION_NOTES = {
    "bf16+fp32-master": "bf16 weights/activations, fp32 main grads, fp32 master weights and "
                        "AdamW state in megatron's Float16Optimizer",
    "bf16": "pure bf16: bf16 weights, grads and AdamW state; cross-entropy in fp32",
    "amp-bf16": "fp32 weights, grads and AdamW state; bf16 autocast for forward/backward",
    "fp32": "fp32 everything (TF32 matmuls on CUDA)",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Arguments, shape, data
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="CPU-sized shape: 2 layers, d=128, 4 heads, seq 128, micro-batch 2, "
                        "vocab 1024")
    p.add_argument("--model-config", default=str(REPO / "configs" / "model" / "1b.yaml"),
                   help="model YAML for the full shape (default configs/model/1b.yaml)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation...)")
    p.add_argument("--which", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all; "
                        "plain_compiled is dropped on CPU unless named here)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default 32000, or 1024 with --tiny); padded as ours")
    p.add_argument("--micro-batch", type=int, default=None, help="default 4 (2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="override the sequence length")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model overrides as in Hydra's model.*, e.g. name=plt loops=2 "
                        "loop.kernel=triton moe.layer=bigmac (only 'ours' builds non-GPT models)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU (as plt_train's train.precision)")
    p.add_argument("--plain-precision", choices=("bf16", "amp"), default="bf16",
                   help="with bf16: plain model in pure bf16 (default), or amp = fp32 master "
                        "weights + bf16 autocast (the same precision recipe as ours)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping (all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the device peak used for MFU")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of tokens/s here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def model_config(args) -> tuple[ModelConfig, int, int]:
    """(ModelConfig, unpadded vocab, micro-batch) for this run."""
    from omegaconf import OmegaConf

    # The typed schema first, as the main job composes it: nested groups (loop, moe) become
    # their dataclasses and unknown keys fail.
    fields = OmegaConf.create(TINY) if args.tiny else OmegaConf.load(args.model_config)
    extra = {"seq_length": args.seq, "num_layers": args.layers}
    dotlist = [f"{k}={v}" for k, v in extra.items() if v] + list(args.set)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), fields,
                             OmegaConf.from_dotlist(dotlist))
    # backend defaults to "auto": megatron-core + SDPA unless TE is installed on a CUDA machine.
    cfg = OmegaConf.to_object(merged)
    vocab = args.vocab or (TINY_VOCAB if args.tiny else 32000)
    mb = args.micro_batch or (TINY_MICRO_BATCH if args.tiny else FULL_MICRO_BATCH)
    return cfg, vocab, mb


def make_batches(vocab: int, mb: int, seq: int, device, seed: int) -> list[dict]:
    """POOL_BATCHES batches of Zipf-distributed tokens, on the device, identical per variant."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = probs[torch.randperm(vocab, generator=gen)]
    batches = []
    for _ in range(POOL_BATCHES):
        seqs = torch.multinomial(probs.float(), mb * (seq + 1), replacement=True,
                                 generator=gen).view(mb, seq + 1)
        batches.append({
            "tokens": seqs[:, :-1].contiguous().to(device),
            "labels": seqs[:, 1:].contiguous().to(device),
            "loss_mask": torch.ones(mb, seq, dtype=torch.float32, device=device),
            "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(mb, -1)
            .contiguous(),
        })
    return batches


def cycle(batches):
    while True:
        yield from batches


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(name: str, step_fn, warmup: int, steps: int, device: torch.device) -> dict:
    """Call ``step_fn() -> loss`` warmup + steps times; per-step wall time around a device sync."""
    times, losses = [], []
    total = warmup + steps
    for i in range(total):
        sync(device)
        t0 = time.perf_counter()
        loss = float(step_fn())
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(loss)
        tag = "warmup" if i < warmup else "timed"
        log(f"{name} step {i + 1}/{total} ({tag}) loss {loss:.4f} {dt * 1e3:.1f} ms")
    timed = times[warmup:]
    return {"step_s": statistics.median(timed), "step_ms_all": [t * 1e3 for t in times],
            "first_step_s": times[0], "losses": losses}


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

def build_ours(cfg: ModelConfig, vocab: int, dtype, dev, optim: OptimConfig, total_steps, seed):
    """The main job's model (``prepare_for_training``: DDP, gradient hooks, metric sources),
    optimizer and schedule, on one process."""
    from plt_train.models import get_family
    from plt_train.runtime import set_seed
    from plt_train.training.optim import build_optimizer, build_scheduler

    run = RunConfig(model=cfg, parallel=ParallelConfig(), optim=optim,
                    train=TrainConfig(seed=seed))
    set_seed(seed)
    model = get_family(cfg.name).prepare_for_training(run, vocab, dtype, dev)
    optimizer = build_optimizer(model.chunks, optim, run.parallel, dtype)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    return model, optimizer, scheduler


def describe_optimizer(opt) -> str:
    """e.g. 'ChainedOptimizer > Float16OptimizerWithFloat16Params > AdamW(foreach: auto)'."""
    names = []
    while True:
        names.append(type(opt).__name__)
        if getattr(opt, "chained_optimizers", None):
            opt = opt.chained_optimizers[0]
        elif getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:
            opt = opt.optimizer
        else:
            break
    d = getattr(opt, "defaults", {})
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else (
        "foreach: auto" if d.get("foreach") is None else "single-tensor")
    return " > ".join(names) + f"({impl})"


def run_ours(ctx: dict) -> dict:
    from plt_train.models.common.backends import resolve_backend
    from plt_train.training.step import train_step

    cfg, dev, dtype, mb = ctx["cfg"], ctx["dev"], ctx["dtype"], ctx["mb"]
    model, optimizer, scheduler = build_ours(
        cfg, ctx["vocab"], dtype, dev, ctx["optim"], ctx["warmup"] + ctx["steps"], ctx["seed"])
    info = {
        "params": sum(p.numel() for c in model.chunks for p in c.parameters()),
        "precision": "bf16+fp32-master" if dtype == torch.bfloat16 else "fp32",
        "optimizer": describe_optimizer(optimizer),
        "backend": resolve_backend(cfg.backend),
    }
    data = cycle(make_batches(ctx["vocab"], mb, cfg.seq_length, dev.device, ctx["seed"]))

    def step():
        out = train_step(model, optimizer, scheduler, data, 1, cfg.seq_length, mb, dev.device)
        return out["loss"]

    try:
        return {**info, **run_steps("ours", step, ctx["warmup"], ctx["steps"], dev.device)}
    finally:
        # Break the reference cycle config -> no_sync -> DDP module before freeing.
        model.config.finalize_model_grads_func = None
        model.config.no_sync_func = None
        del model, optimizer, scheduler, data


def param_groups(model, weight_decay: float):
    """Weight decay on matrices only (megatron's rule: no decay for norms and biases)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def run_plain(ctx: dict, compiled: bool) -> dict:
    cfg, dev, dtype, mb, optim = ctx["cfg"], ctx["dev"], ctx["dtype"], ctx["mb"], ctx["optim"]
    name = "plain_compiled" if compiled else "plain_eager"
    amp = dtype == torch.bfloat16 and ctx["plain_precision"] == "amp"
    weight_dtype = torch.float32 if amp else dtype
    torch.manual_seed(ctx["seed"])
    with torch.device(dev.device):  # initialise on the device: ~1B CPU normal_ draws are slow
        model = PlainGPT(
            vocab_size=cfg.padded_vocab_size(ctx["vocab"]), hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            ffn_hidden_size=cfg.ffn_size, seq_length=cfg.seq_length,
            norm_epsilon=cfg.norm_epsilon, rotary_base=cfg.rotary_base,
            init_method_std=cfg.init_method_std,
        ).to(dtype=weight_dtype)
    cuda = dev.device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=(optim.beta1, optim.beta2), eps=optim.eps,
                            **({"fused": True} if cuda else {"foreach": True}))
    params = [p for p in model.parameters()]
    info = {
        "params": count_parameters(model),
        "precision": "amp-bf16" if amp else ("bf16" if dtype == torch.bfloat16 else "fp32"),
        "optimizer": describe_optimizer(opt),
        "backend": "torch.compile" if compiled else "eager",
    }
    fwd = torch.compile(model) if compiled else model
    data = cycle(make_batches(ctx["vocab"], mb, cfg.seq_length, dev.device, ctx["seed"]))
    clip = optim.clip_grad

    def step():
        batch = next(data)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fwd(batch["tokens"], batch["labels"])
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        return loss.detach().item()

    try:
        return {**info, **run_steps(name, step, ctx["warmup"], ctx["steps"], dev.device)}
    finally:
        del model, fwd, opt, params, data
        if compiled:
            torch._dynamo.reset()


def free_memory(dev) -> None:
    gc.collect()
    if dev.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        log(f"freed: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated")


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def finish_record(rec: dict, ctx: dict) -> dict:
    """Add tokens/s, TFLOP/s, MFU and the loss sanity check to a variant's raw timings."""
    step_s = rec["step_s"]
    peak = ctx["peak_amp"] if rec["precision"] in ("bf16", "amp-bf16", "bf16+fp32-master") \
        else ctx["peak_fp32"]
    flops = ctx["flops_per_step"] / step_s
    losses = rec["losses"]
    rec.update(
        ms_per_step=step_s * 1e3,
        tokens_per_s=ctx["tokens_per_step"] / step_s,
        tflops=flops / 1e12,
        mfu=flops / peak[0],
        peak_tflops=peak[0] / 1e12,
        peak_source=peak[1],
        first_loss=losses[0],
        final_loss=losses[-1],
        loss_ok=all(math.isfinite(x) for x in losses) and losses[-1] < losses[0],
    )
    return rec


def print_table(records: list[dict], ctx: dict) -> None:
    cols = ("variant", "precision", "ms/step", "tokens/s", "TFLOP/s", "MFU", "peak mem",
            "loss first->last", "params")
    rows = []
    for r in records:
        if "error" in r:
            rows.append((r["variant"], "-", "FAILED", "", "", "", "", "", ""))
            continue
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
        loss = f"{r['first_loss']:.3f}->{r['final_loss']:.3f}" + ("" if r["loss_ok"] else " !")
        rows.append((r["variant"], r["precision"], f"{r['ms_per_step']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.2f}", f"{100 * r['mfu']:.1f}%",
                     mem, loss, f"{r['params']:,}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print("\n" + "=" * len(line))
    print(ctx["title"])
    print("-" * len(line))
    print(line)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("-" * len(line))
    for r in records:
        if "error" in r:
            print(f"{r['variant']} FAILED: {r['error'][:300]}")
    for prec in dict.fromkeys(r.get("precision") for r in records if "error" not in r):
        print(f"precision {prec}: {PRECISION_NOTES[prec]}")
    amp, fp32 = ctx["peak_amp"], ctx["peak_fp32"]
    if fp32 is amp:
        print(f"MFU against a peak of {amp[0] / 1e12:.1f} TFLOP/s ({amp[1]})")
    else:
        print(f"MFU against a peak of {amp[0] / 1e12:.1f} TFLOP/s ({amp[1]}) for bf16 rows, "
              f"{fp32[0] / 1e12:.1f} TFLOP/s ({fp32[1]}) for fp32 rows")
    if any(not r.get("loss_ok", True) for r in records if "error" not in r):
        print("WARNING: '!' = a loss was not finite or did not decrease over the run")
    first = next((r for r in records if r.get("ratio_ours_over_baseline") is not None), None)
    if first:
        base, ratio = first["ratio_vs"], first["ratio_ours_over_baseline"]
        target = (" (target >= 0.90: " + ("met" if ratio >= 0.9 else "NOT met") + ")"
                  if base == "plain_compiled" else " (no compiled baseline: target not assessed)")
        print(f"ratio ours / {base} (tokens/s): {ratio:.3f}{target}")
    print("=" * len(line), flush=True)


def write_plot(path: str, records: list[dict], ctx: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"{r['variant']}\n({r['precision']})" for r in ok]
    values = [r["tokens_per_s"] for r in ok]
    bars = ax.bar(names, values, color=["#1f77b4" if r["variant"] == "ours" else "#aaaaaa"
                                        for r in ok])
    for bar, r in zip(bars, ok):
        ax.annotate(f"{r['tokens_per_s']:,.0f}\nMFU {100 * r['mfu']:.1f}%",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s (median step)")
    ax.set_ylim(0, max(values or [1]) * 1.25)
    title = ctx["title"]
    if ok and ok[0].get("ratio_ours_over_baseline") is not None:
        title += f"\nratio ours / {ok[0]['ratio_vs']}: {ok[0]['ratio_ours_over_baseline']:.3f}"
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def select_variants(which: str | None, cuda: bool, plain_gpt: bool = True) -> list[str]:
    """The variants to run; the plain baselines only where the model is a dense GPT (the
    shape ``plain_gpt.py`` builds): PLT or MoE models (``--set``) run ``ours`` alone."""
    if which:
        chosen = [w.strip() for w in which.split(",") if w.strip()]
        unknown = sorted(set(chosen) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"bench_train: unknown variant(s) {unknown}; choose from {VARIANTS}")
        if not plain_gpt and chosen != ["ours"]:
            raise SystemExit("bench_train: the plain baselines are dense GPTs; a looped or MoE "
                             "model (--set) runs with --which ours")
        return chosen
    if not plain_gpt:
        return ["ours"]
    chosen = list(VARIANTS)
    if not cuda:
        chosen.remove("plain_compiled")
        log("skipping plain_compiled: no CUDA device (torch.compile on CPU needs a C++ "
            "toolchain and minutes of compilation; name it in --which to run it anyway)")
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    logging.getLogger("megatron").setLevel(logging.WARNING)

    from plt_train.models import get_family
    from plt_train.runtime import destroy_distributed, detect_device, init_distributed
    from plt_train.runtime.device import resolve_dtype
    from plt_train.training.metrics import peak_flops_per_second

    dev = detect_device()
    cfg, vocab, mb = model_config(args)
    variants = select_variants(args.which, dev.is_cuda,
                               plain_gpt=cfg.name == "gpt" and cfg.moe.layer == "dense")
    dtype = resolve_dtype(args.precision, dev)
    if dev.is_cuda:  # fp32 runs use TF32 matmuls (the peak MFU is measured against)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    padded = cfg.padded_vocab_size(vocab)
    flops = get_family(cfg.name).flops_per_sequence(cfg, padded)  # loops and MoE included
    optim = OptimConfig(lr=args.lr, min_lr=0.0, clip_grad=args.clip_grad, warmup_steps=0,
                        decay_style="constant")
    peak_amp = peak_flops_per_second(dev.device, dtype, args.peak_tflops)
    peak_fp32 = peak_amp if dtype == torch.float32 else peak_flops_per_second(
        dev.device, torch.float32, args.peak_tflops)
    shape = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "num_attention_heads": cfg.num_attention_heads, "ffn_hidden_size": cfg.ffn_size,
             "seq_length": cfg.seq_length, "micro_batch_size": mb, "vocab_size": vocab,
             "padded_vocab_size": padded}
    arch = cfg.name + (f"-{cfg.loops} kernel={cfg.loop.kernel}" if cfg.name in ("looped", "plt")
                       else "")
    if cfg.moe.layer != "dense":
        arch += (f" {cfg.moe.layer} E{cfg.moe.num_experts} top{cfg.moe.top_k} "
                 f"dcca_kernel={cfg.moe.dcca_kernel}")
    title = (f"{dev.name}: {arch} {cfg.num_layers}L d={cfg.hidden_size} "
             f"h={cfg.num_attention_heads} ffn={cfg.ffn_size} seq={cfg.seq_length} mb={mb} "
             f"V={padded}, "
             f"{args.steps} timed steps (median), torch {torch.__version__}")
    ctx = dict(cfg=cfg, dev=dev, dtype=dtype, mb=mb, vocab=vocab, optim=optim, seed=args.seed,
               warmup=args.warmup, steps=args.steps, plain_precision=args.plain_precision,
               flops_per_step=flops.training * mb, tokens_per_step=mb * cfg.seq_length,
               peak_amp=peak_amp, peak_fp32=peak_fp32, title=title)
    log(title)
    log(f"variants {variants}; dtype {dtype}; {flops.training * mb / 1e12:.3f} TFLOP per step; "
        f"peak {peak_amp[0] / 1e12:.1f} TFLOP/s ({peak_amp[1]})")

    init_distributed(dev)  # one-rank group (no torchrun needed); megatron's parallel state
    records = []
    try:
        for name in variants:
            base = {"variant": name, "device": dev.name, "shape": shape,
                    "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__}
            log(f"--- {name} ---")
            if dev.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                raw = run_ours(ctx) if name == "ours" else run_plain(
                    ctx, compiled=name == "plain_compiled")
                rec = finish_record({**base, **raw}, ctx)
                rec["peak_mem_gib"] = (torch.cuda.max_memory_allocated() / 2**30
                                       if dev.is_cuda else None)
                log(f"{name}: {rec['ms_per_step']:.1f} ms/step, {rec['tokens_per_s']:,.0f} "
                    f"tokens/s, MFU {100 * rec['mfu']:.1f}%")
            except Exception as err:  # keep going: a remote run should report what it can
                traceback.print_exc()
                rec = {**base, "error": f"{type(err).__name__}: {err}"}
            records.append(rec)
            free_memory(dev)
    finally:
        destroy_distributed()

    ok = {r["variant"]: r for r in records if "error" not in r}
    if "ours" in ok and ("plain_compiled" in ok or "plain_eager" in ok):
        base = ok.get("plain_compiled") or ok["plain_eager"]
        ratio = ok["ours"]["tokens_per_s"] / base["tokens_per_s"]
        for r in records:
            r["ratio_vs"] = base["variant"]
            r["ratio_ours_over_baseline"] = ratio
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=2))
        log(f"wrote {args.out}")
    if args.plot:
        try:
            write_plot(args.plot, records, ctx)
            log(f"wrote {args.plot}")
        except Exception:  # the numbers matter more than the picture
            traceback.print_exc()
    print_table(records, ctx)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
