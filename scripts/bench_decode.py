"""Decode benchmark: per-token latency and KV-cache bytes of vanilla, looped and PLT models.

    python scripts/bench_decode.py                     # CPU default (a few minutes)
    python scripts/bench_decode.py --tiny              # seconds (CI smoke test)
    python scripts/bench_decode.py --layers 16 --hidden 2048 --heads 16 --groups 4  # GPU

For each model (vanilla; looped R=2, 3; PLT R=2, 3 — same shared block) and batch size
(1 and 32): a ``--prompt``-token context (1024) in the cache, then ``--new`` (128) decode
steps timed one by one (device synchronised), after ``--warmup`` untimed steps, the models
taking turns step by step so that load drifting on a shared machine hits them alike.
``ms_per_token`` is the mean step time: one new token for every sequence of the batch.

The cache is filled with random K/V for the prompt instead of running the prefill
(``--real-prefill`` runs it): a decode step's cost does not depend on the cached values, and a
1024-token prefill at batch 32 would take minutes on two CPU cores.  Weights are random.
``kv_bytes`` is the cache at the end (prompt + new tokens).  Targets (issue): PLT-R at most
1.15x vanilla at batch 1 and 1.3x at batch 32 (looped-R about R x); PLT's KV bytes exactly
``1 + (R-1) * w / S`` x vanilla.  On CPU the matmuls of 32 x R rows are compute-bound, so the
batch-32 target is a GPU target (decode there is weight-bandwidth-bound).

Decode-step variants, side by side in one run (every combination is timed, round-robin):
``--cuda-graph off on`` (eager steps vs one CUDA graph per step, replayed; ``auto`` = on for
CUDA with dense MLPs) and ``--kernel torch triton`` (``model.loop.kernel``: PLT's decode
attention as SDPA calls vs one Triton launch per layer; vanilla and looped do not use it and
are timed once per ``--cuda-graph`` value).  E.g. on a GPU::

    python scripts/bench_decode.py --cuda-graph off on --kernel torch triton ...

``latency_vs_vanilla`` compares with vanilla (of ``--layers``) under the same ``--cuda-graph``
mode.  ``--models`` picks the models, each ``NAME[-LOOPS][@LAYERS][:wWINDOW]``: ``vanilla@16``
beside ``looped-2`` over 8 layers is the deeper plain model of the same compute, and
``plt-2:w16`` beside ``plt-2:w256`` a PLT at two windows (the others at ``--window``).

Prints a table last; writes JSON (records with model, loops, batch, ms_per_token, kv_bytes,
device, cuda_graph, kernel, ...) and a PNG plot (of the first variant).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plt_train.config.schema import KernelChoice, Switch  # noqa: E402

MODELS = ["vanilla", "looped-2", "looped-3", "plt-2", "plt-3"]


def parse_model(spec: str, layers: int, window: int) -> tuple[str, int, int, int | None]:
    """``NAME[-LOOPS][@LAYERS][:wWINDOW]`` (``plt-2``, ``vanilla@16``, ``plt-2:w16``) as
    (name, loops, layers, window); the layers default to ``--layers``, the loops to 1, a
    PLT's window to ``--window`` (None for the others, which have none)."""
    match = re.fullmatch(r"(vanilla|looped|plt)(?:-(\d+))?(?:@(\d+))?(?::w(\d+))?", spec)
    if not match:
        raise SystemExit(f"--models: {spec!r} is not NAME[-LOOPS][@LAYERS][:wWINDOW] with "
                         "NAME vanilla, looped or plt")
    name, loops, depth, win = match.groups()
    loops, depth = int(loops or 1), int(depth or layers)
    if (loops == 1) != (name == "vanilla") or depth < 1 or (win and name != "plt") \
            or (win and int(win) < 1):
        raise SystemExit(f"--models: {spec!r}: vanilla has one loop, looped and plt two or "
                         "more, a model at least one layer, and only plt a window (of at "
                         "least one token)")
    return name, loops, depth, (int(win) if win else window) if name == "plt" else None


def build(name, loops, layers, window, args, device, dtype):
    """Random weights; every model from the same seed, so models of the same depth share
    the block's weights."""
    from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
    from plt_train.models import build_model
    from plt_train.runtime.device import megatron_device_kwargs

    m = ModelConfig(name=name, loops=loops, num_layers=layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, num_query_groups=args.groups,
                    seq_length=args.prompt + args.new + args.warmup,
                    # each model's own feed between loops, pinned: a decode step of
                    # looped runs no norm between its passes, PLT's its one norm per step
                    loop=LoopConfig(window=window or args.window,
                                    norm_between_loops=name == "plt"))
    chunks, _, _ = build_model(m, ParallelConfig(), args.vocab, dtype,
                               megatron_device_kwargs(device), 0, device.device)
    return chunks[0].eval()


def synthetic_prefill(gen, batch, args, device):
    """A cache holding ``--prompt`` random positions, and random fed-on loop outputs."""
    cache = gen.new_cache(batch, args.prompt + args.new + args.warmup)
    g = torch.Generator(device=device).manual_seed(0)
    for k, v in (*cache.full.values(), *cache.win.values()):
        for t in (k, v):
            t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32))
    cache.valid[:, :args.prompt] = True
    cache.win_valid[:] = True
    cache.advance(args.prompt)
    fed = [torch.randn(1, batch, args.hidden, generator=g, device=device).to(gen.dtype)
           for _ in range(gen.loops - 1)] if gen.one_pass else []
    return cache, fed


def variants(args) -> list:
    """((name, loops, layers, window), cuda_graph choice, kernel choice or None) for every
    timed run."""
    out = []
    for graph in args.cuda_graph:
        for model in args.models:
            kernels = args.kernel if model[0] == "plt" else [None]
            out += [(model, graph, kernel) for kernel in kernels]
    return out


def distinct_step_modes(choices: list, model, device) -> list:
    """``--cuda-graph`` values as on/off, once each (auto is one of them on this device)."""
    from plt_train.inference.generator import step_mode

    modes = [step_mode(c, model, device.device) for c in choices]
    return list(dict.fromkeys("on" if m == "graph" else "off" for m in modes))


def bench_batch(models, batch, args, device, dtype) -> list:
    """All variants at one batch size, timed round-robin (step i of every run, then step
    i+1, ...) so that drifting load on a shared machine hits every run alike.  The first
    (untimed warm-up) step of a CUDA-graph run captures its graph."""
    from plt_train.inference import Generator

    sync = torch.cuda.synchronize if device.is_cuda else (lambda: None)
    runs = []
    with torch.inference_mode():
        for key, graph, kernel in variants(args):
            model = models[key]
            gen = Generator(model, cuda_graph=graph)
            if args.real_prefill:
                tokens = torch.tensor([[(7 * i + b) % args.vocab for i in range(args.prompt)]
                                       for b in range(batch)], device=device.device)
                cache = gen.new_cache(batch, args.prompt + args.new + args.warmup)
                _, fed = gen.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), cache)
            else:
                cache, fed = synthetic_prefill(gen, batch, args, device.device)
            token = torch.zeros(batch, dtype=torch.long, device=device.device)
            runs.append({"model": key, "kernel": kernel, "gen": gen, "cache": cache,
                         "fed": fed, "token": token, "times": []})
        for i in range(args.warmup + args.new):
            for run in runs:
                cache, model = run["cache"], run["gen"].model
                model.opts.kernel = run["kernel"] or "auto"  # read at run (or capture) time
                position = torch.full((batch,), cache.length, device=device.device)
                sync()
                start = time.perf_counter()
                logits, run["fed"] = run["gen"].decode(run["token"], position, run["fed"], cache)
                run["token"] = logits.argmax(-1)
                sync()
                if i >= args.warmup:
                    run["times"].append(time.perf_counter() - start)
    records = []
    for run in runs:
        (name, loops, layers, window), times, S = run["model"], run["times"], run["cache"].length
        records.append({
            "model": name, "loops": loops, "batch": batch,
            "cuda_graph": run["gen"].step_mode, "kernel": run["kernel"],
            "ms_per_token": 1e3 * statistics.fmean(times),
            "ms_per_token_median": 1e3 * statistics.median(times),
            "kv_bytes": run["cache"].kv_bytes(), "cached_positions": S, "window": window,
            "kv_bound": 1 + (loops - 1) * window / S if name == "plt" else None,
            "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "layers": layers, "hidden": args.hidden,
            "prefill": "real" if args.real_prefill else "synthetic"})
    del runs
    if device.is_cuda:
        torch.cuda.empty_cache()
    return records


def label(r: dict) -> str:
    kernel = f", kernel {r['kernel']}" if r["kernel"] else ""
    return f"{short_name(r)} ({r['cuda_graph']}{kernel})"


def short_name(r: dict) -> str:
    """The record's ``--models`` entry, in full: ``plt-2@8:w64``, ``vanilla-1@16``."""
    window = f":w{r['window']}" if r["window"] is not None else ""
    return f"{r['model']}-{r['loops']}@{r['layers']}{window}"


def device_name(device) -> str:
    if device.is_cuda:
        return torch.cuda.get_device_name()
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def add_ratios(records: list, layers: int) -> None:
    """Latency and KV bytes over vanilla's of ``layers`` layers, same batch and step mode."""
    base = {(r["batch"], r["cuda_graph"]): r for r in records
            if r["model"] == "vanilla" and r["layers"] == layers}
    for r in records:
        b = base.get((r["batch"], r["cuda_graph"]))
        if b:
            r["latency_vs_vanilla"] = r["ms_per_token"] / b["ms_per_token"]
            r["kv_vs_vanilla"] = r["kv_bytes"] / b["kv_bytes"]


def plot(records: list, path: Path) -> None:
    """Latency and KV bytes vs vanilla, for the first variant (``--cuda-graph`` and
    ``--kernel`` values) only."""
    graph = records[0]["cuda_graph"]
    kernel = next((r["kernel"] for r in records if r["kernel"]), None)
    records = [r for r in records if r["cuda_graph"] == graph and r["kernel"] in (None, kernel)]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(dict.fromkeys(short_name(r) for r in records))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        rows = {short_name(r): r for r in records if r["batch"] == b}
        xs = [j + i * width for j in range(len(labels))]
        axes[0].bar(xs, [rows[k]["latency_vs_vanilla"] if k in rows else 0 for k in labels],
                    width, label=f"batch {b}")
    axes[0].set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(labels))], labels)
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set_ylabel("decode latency / vanilla")
    axes[0].legend()
    rows = {short_name(r): r for r in records if r["batch"] == batches[0]}
    axes[1].bar(labels, [rows[k]["kv_vs_vanilla"] if k in rows else 0 for k in labels])
    axes[1].set_ylabel("KV-cache bytes / vanilla")
    fig.suptitle(f"decode on {records[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=MODELS,
                    help="NAME[-LOOPS][@LAYERS][:wWINDOW] (vanilla, looped-2, plt-3, "
                         "vanilla@16, plt-2:w16); the ratios are over vanilla at --layers, "
                         "which must be among them")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--real-prefill", action="store_true")
    ap.add_argument("--cuda-graph", nargs="+", default=["auto"],
                    choices=[c.value for c in Switch],
                    help="decode step eager (off) or replayed from a CUDA graph (on); "
                         "several values: each is timed")
    ap.add_argument("--kernel", nargs="+", default=["auto"],
                    choices=[c.value for c in KernelChoice],
                    help="model.loop.kernel of the PLT models (decode attention); several "
                         "values: each is timed")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_decode")
    args = ap.parse_args()
    if args.tiny:  # small defaults; options given explicitly still win
        tiny = dict(layers=2, hidden=64, heads=4, groups=2, vocab=256, window=8, prompt=32,
                    new=6, batch=[1, 4])
        for key, value in tiny.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    warnings.filterwarnings("ignore")
    from plt_train.runtime import detect_device, init_distributed
    from plt_train.runtime.device import resolve_dtype

    device = detect_device()
    init_distributed(device)
    dtype = resolve_dtype("auto", device)
    args.warmup = max(args.warmup, 1)  # a graph run's first step captures it: never timed
    records = []
    args.models = list(dict.fromkeys(parse_model(m, args.layers, args.window)
                                     for m in args.models))
    if ("vanilla", 1, args.layers, None) not in args.models:
        raise SystemExit(f"--models: the ratios need vanilla at --layers {args.layers}")
    models = {key: build(*key, args, device, dtype) for key in args.models}
    args.cuda_graph = distinct_step_modes(args.cuda_graph, models[args.models[0]], device)
    for batch in args.batch:
        for r in bench_batch(models, batch, args, device, dtype):
            print(f"[bench_decode] {label(r)} batch {batch}: "
                  f"{r['ms_per_token']:.2f} ms/token", flush=True)
            records.append(r)
    add_ratios(records, args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decode.json").write_text(json.dumps(records, indent=2))
    plot(records, args.out / "bench_decode.png")
    print(f"\ndevice: {records[0]['device']}, {records[0]['dtype']}, {args.layers} layers, "
          f"d={args.hidden}, prompt {args.prompt}, {args.new} new tokens, window {args.window}")
    print(f"{'model':10} {'step':>6} {'kernel':>6} {'batch':>5} {'ms/token':>9} "
          f"{'x vanilla':>9} {'KV MiB':>9} {'KV x van.':>9} {'KV bound':>9}")
    for r in records:
        bound = f"{r['kv_bound']:.4f}" if r["kv_bound"] else "-"
        name = f"{r['model']}-{r['loops']}" + \
            (f"@{r['layers']}" if r["layers"] != args.layers else "") + \
            (f":w{r['window']}" if r["window"] not in (None, args.window) else "")
        print(f"{name:10} {r['cuda_graph']:>6} "
              f"{r['kernel'] or '-':>6} {r['batch']:>5} {r['ms_per_token']:>9.2f} "
              f"{r['latency_vs_vanilla']:>9.2f} {r['kv_bytes'] / 2**20:>9.2f} "
              f"{r['kv_vs_vanilla']:>9.4f} {bound:>9}")
    print(f"JSON and plot in {args.out}")


if __name__ == "__main__":
    main()
