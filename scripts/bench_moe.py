"""All-to-all bytes and time of fine-grained MoE (CDAC) vs BigMac (DCCA), measured.

    python scripts/bench_moe.py                       # CPU: EP 1, 2, 4 over gloo (~1-2 min)
    python scripts/bench_moe.py --tiny --ep 1,2       # seconds (the CI test)
    python scripts/bench_moe.py --hidden 2048 ...     # on GPUs: NCCL, EP up to the GPU count

For every expert-parallel size EP (EP processes under torchrun, one device each, fixed tokens
per rank: weak scaling, as on a cluster) and every layer x top-k, one MoE layer runs
``--warmup`` + ``--iters`` forward+backward passes on random tokens.  Per iteration it records,
from the dispatcher's own counters (``plt_train.models.moe.accounting``):

* ``a2a_bytes``: bytes each rank put on the all-to-all wire (dispatch + combine, forward +
  backward; mean over ranks), and the same from the paper's formula for this shape
  (``a2a_bytes_formula``: 4 x top_k x (EP-1)/EP x tokens x width x bytes, balanced routing);
* ``a2a_ms``: time inside the all-to-all calls (exposed: megatron's dispatcher does not overlap
  it; on CPU the wall time of the blocking gloo call, on CUDA CUDA-event time on the stream);
  median over iterations, mean over ranks (``a2a_ms_max``: the slowest rank);
* ``layer_ms``: the layer's forward + backward wall time (median over iterations, slowest
  rank), and ``a2a_share`` = a2a_ms / layer_ms.

Routing is dropless by default (``--capacity`` sets a factor) so that both layer types move
every assignment.  Then an analytic projection with the paper's Table 3 formulas
(``plt_train.models.moe.flops.paper_table3``) to a 32-GPU cluster at 100 Gb/s per GPU for the
GPT3-XL and GPT3-6.7B shapes (64 experts, EP=32, bf16, 0.5M tokens per iteration): all-to-all
volume and time per iteration, compute time at ``--proj-tflops`` per GPU, and the step-time
ratio; the same formula is checked against the measured bytes above (ratio column).

Outputs: the tables (printed last), ``--out`` JSON (a list of records: layer, ep, topk,
a2a_bytes, a2a_ms, layer_ms, device, ... plus ``projection`` records) and ``--plot`` PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = ("fine_grained", "bigmac")
# Projection shapes (GPT-3 paper sizes) and the paper's cluster.
PROJ_SHAPES = {"GPT3-XL": dict(h=2048, l=24, v=50257), "GPT3-6.7B": dict(h=4096, l=32, v=50257)}
PROJ_GPUS, PROJ_LINK_GBPS, PROJ_TOKENS, PROJ_SEQ = 32, 100.0, 2**19, 2048


def log(msg: str) -> None:
    print(f"[bench_moe] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", default="1,2,4", help="expert-parallel sizes (processes), comma list")
    p.add_argument("--topk", default="4,8", help="top-k values, comma list")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per iteration")
    p.add_argument("--capacity", type=float, default=None, help="capacity factor (default "
                   "dropless)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    p.add_argument("--tiny", action="store_true", help="h=64, 8 experts, 64 tokens, 2 iters")
    p.add_argument("--proj-tflops", type=float, default=100.0,
                   help="achieved TFLOP/s per GPU assumed by the projection")
    p.add_argument("--out", default=None, help="JSON records")
    p.add_argument("--plot", default=None, help="PNG")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.experts, args.tokens, args.iters, args.warmup = 64, 8, 64, 2, 1
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# ---------------------------------------------------------------------------------------------
# Worker: one torchrun process group of EP ranks
# ---------------------------------------------------------------------------------------------

def formula_bytes_per_rank(tokens: int, topk: int, ep: int, width: int, elem: int) -> float:
    """Paper's C = 2 top_k (ep-1)/ep b s h per pass, per rank's tokens, times 2 (backward)."""
    return 4 * topk * (ep - 1) / ep * tokens * width * elem


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
    from plt_train.models.init import init_weights
    from plt_train.models.moe import mlp_spec
    from plt_train.runtime import detect_device, init_distributed, set_seed
    from plt_train.runtime.device import megatron_device_kwargs, resolve_dtype

    dev = detect_device()
    ep = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed(dev, ep=ep)
    set_seed(0)
    dtype = resolve_dtype(args.dtype, dev)
    rank = dist.get_rank()
    device_name = f"{dev.name} ({dev.backend}, {ep} process{'es' if ep > 1 else ''})"
    heads = max(1, args.hidden // 64)
    records = []

    def sync():
        if dev.is_cuda:
            torch.cuda.synchronize()

    def reduce(values, op):
        t = torch.tensor(values, dtype=torch.float64, device=dev.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    for layer_type in args.layers.split(","):
        for topk in ints(args.topk):
            moe = MoEConfig(layer=layer_type, num_experts=args.experts, top_k=topk,
                            ratio=args.ratio, capacity_factor=args.capacity, aux_loss_coeff=1e-3)
            model = ModelConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=heads,
                                seq_length=args.tokens, moe=moe)
            tc = to_transformer_config(model, ParallelConfig(expert=ep), dtype,
                                       megatron_device_kwargs(dev))
            layer = build_module(mlp_spec(model), config=tc).to(dev.device)
            layer.set_layer_number(1)
            init_weights([layer], seed=1, std=0.02, num_layers=1)
            gen = torch.Generator(device=dev.device).manual_seed(100 + rank)
            x = torch.randn(args.tokens, 1, args.hidden, generator=gen, device=dev.device,
                            dtype=dtype)
            g = torch.randn(args.tokens, 1, args.hidden, generator=gen, device=dev.device,
                            dtype=dtype)
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=dev.device))
            layer_ms, a2a_ms, a2a_bytes = [], [], []
            for it in range(args.warmup + args.iters):
                layer.zero_grad(set_to_none=True)
                xi = x.detach().requires_grad_(True)
                dist.barrier()
                sync()
                layer.a2a.reset()
                t0 = time.perf_counter()
                out, _ = layer(xi)
                out.backward(g)
                sync()
                elapsed = time.perf_counter() - t0
                snap = layer.a2a.snapshot()
                if it >= args.warmup:
                    layer_ms.append(1e3 * elapsed)
                    a2a_ms.append(snap["a2a_ms"])
                    a2a_bytes.append(snap["a2a_bytes"])
            width = args.hidden if layer_type == "fine_grained" else int(args.ratio * args.hidden)
            elem = torch.empty((), dtype=dtype).element_size()
            med_layer, med_a2a = statistics.median(layer_ms), statistics.median(a2a_ms)
            mean_bytes = statistics.mean(a2a_bytes)
            sum_bytes, sum_a2a = reduce([mean_bytes, med_a2a], dist.ReduceOp.SUM)
            max_layer, max_a2a = reduce([med_layer, med_a2a], dist.ReduceOp.MAX)
            params = sum(p.numel() for p in layer.parameters())
            rec = {
                "layer": layer_type, "ep": ep, "topk": topk, "device": device_name,
                "dtype": str(dtype).replace("torch.", ""), "hidden": args.hidden,
                "experts": args.experts, "ratio": args.ratio, "tokens_per_rank": args.tokens,
                "capacity_factor": args.capacity, "iters": args.iters,
                "a2a_bytes": sum_bytes / ep,
                "a2a_bytes_formula": formula_bytes_per_rank(args.tokens, topk, ep, width, elem),
                "a2a_ms": sum_a2a / ep, "a2a_ms_max": max_a2a, "layer_ms": max_layer,
                "params_per_rank": params,
            }
            rec["a2a_share"] = rec["a2a_ms"] / rec["layer_ms"] if rec["layer_ms"] else 0.0
            formula = rec["a2a_bytes_formula"]
            rec["bytes_vs_formula"] = rec["a2a_bytes"] / formula if formula else None
            records.append(rec)
            del layer
    if rank == 0:
        Path(args.worker).write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------
# Projection (paper Table 3) and reporting
# ---------------------------------------------------------------------------------------------

def projection(topks, experts: int, ratio: float, tflops: float) -> list[dict]:
    from plt_train.models.moe.flops import paper_table3

    out = []
    bytes_per_s = PROJ_LINK_GBPS * 1e9 / 8
    for name, shape in PROJ_SHAPES.items():
        for topk in topks:
            base = None
            for layer in LAYERS:
                t = paper_table3(layer, b=PROJ_TOKENS // PROJ_SEQ, s=PROJ_SEQ, l=shape["l"],
                                 h=shape["h"], v=shape["v"], e=experts, top_k=topk, r=ratio,
                                 ep=PROJ_GPUS)
                a2a_bytes = t.a2a_elements * 2  # bf16
                a2a_s = a2a_bytes / PROJ_GPUS / bytes_per_s
                compute_s = t.flops / PROJ_GPUS / (tflops * 1e12)
                rec = {"kind": "projection", "model": name, "layer": layer, "topk": topk,
                       "ep": PROJ_GPUS, "gpus": PROJ_GPUS, "link_gbps": PROJ_LINK_GBPS,
                       "tokens_per_iter": PROJ_TOKENS, "params": t.params, "flops": t.flops,
                       "a2a_GiB_per_iter": a2a_bytes / 2**30, "a2a_s": a2a_s,
                       "compute_s": compute_s, "step_s": a2a_s + compute_s,
                       "assumed_tflops_per_gpu": tflops}
                if base is None:
                    base = rec
                rec["speedup_vs_fine_grained"] = base["step_s"] / rec["step_s"]
                out.append(rec)
    return out


def print_tables(records: list[dict], proj: list[dict]) -> None:
    print("\n== projection (paper Table 3 formulas): 32 GPUs, 100 Gb/s each, 64 experts, EP=32, "
          f"bf16, 0.5M tokens/iter, {proj[0]['assumed_tflops_per_gpu']:.0f} TFLOP/s per GPU, "
          "no overlap")
    print(f"{'model':10} {'layer':13} {'topk':>4} {'params':>8} {'a2a GiB':>8} {'a2a s':>7} "
          f"{'compute s':>9} {'step s':>7} {'speedup':>7}")
    for r in proj:
        print(f"{r['model']:10} {r['layer']:13} {r['topk']:>4} {r['params'] / 1e9:7.2f}B "
              f"{r['a2a_GiB_per_iter']:8.0f} {r['a2a_s']:7.2f} {r['compute_s']:9.2f} "
              f"{r['step_s']:7.2f} {r['speedup_vs_fine_grained']:6.2f}x")
    r0 = records[0]
    routing = ("dropless" if r0["capacity_factor"] is None
               else f"capacity {r0['capacity_factor']}")
    print(f"\n== measured on {r0['device'].split(' (')[0]}, {r0['dtype']}: h={r0['hidden']}, "
          f"{r0['experts']} experts, r={r0['ratio']}, {r0['tokens_per_rank']} tokens/rank, "
          f"{routing}, one layer fwd+bwd, median of {r0['iters']}")
    print(f"{'layer':13} {'ep':>3} {'topk':>4} {'a2a MB/rank':>11} {'formula MB':>10} "
          f"{'meas/form':>9} {'a2a ms':>8} {'layer ms':>9} {'a2a share':>9}")
    for r in records:
        ratio = f"{r['bytes_vs_formula']:9.3f}" if r["bytes_vs_formula"] else f"{'-':>9}"
        print(f"{r['layer']:13} {r['ep']:>3} {r['topk']:>4} {r['a2a_bytes'] / 2**20:11.3f} "
              f"{r['a2a_bytes_formula'] / 2**20:10.3f} {ratio} {r['a2a_ms']:8.2f} "
              f"{r['layer_ms']:9.2f} {100 * r['a2a_share']:8.1f}%")
    by = {(r["layer"], r["ep"], r["topk"]): r for r in records}
    lines = []
    for (layer, ep, topk), r in sorted(by.items()):
        fg = by.get(("fine_grained", ep, topk))
        if layer == "bigmac" and fg and fg["a2a_bytes"]:
            lines.append(f"EP={ep} top-{topk}: bytes bigmac/fine_grained = "
                         f"{r['a2a_bytes'] / fg['a2a_bytes']:.3f}, a2a time "
                         f"{r['a2a_ms'] / max(fg['a2a_ms'], 1e-9):.2f}x, layer time "
                         f"{r['layer_ms'] / fg['layer_ms']:.2f}x")
    if lines:
        print("\n" + "\n".join(lines))


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({r["ep"] for r in records})
    series = sorted({(r["layer"], r["topk"]) for r in records})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = (("a2a_bytes", "all-to-all MB per rank per iter", 2**20),
               ("a2a_ms", "exposed all-to-all ms", 1.0), ("layer_ms", "layer fwd+bwd ms", 1.0))
    width = 0.8 / len(series)
    for ax, (key, title, scale) in zip(axes, metrics):
        for i, (layer, topk) in enumerate(series):
            ys = [next((r[key] / scale for r in records if r["layer"] == layer
                        and r["topk"] == topk and r["ep"] == ep), 0.0) for ep in eps]
            ax.bar([j + i * width for j in range(len(eps))], ys, width,
                   label=f"{layer} top-{topk}", hatch="//" if layer == "bigmac" else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(eps))], [f"EP={e}" for e in eps])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    r = records[0]
    fig.suptitle(f"fine_grained (CDAC) vs bigmac (DCCA), {r['device'].split(' (')[0]}, "
                 f"h={r['hidden']}, {r['experts']} experts, {r['tokens_per_rank']} tokens/rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch
    n_gpus = torch.cuda.device_count()
    records = []
    for ep in ints(args.ep):
        if n_gpus and ep > n_gpus:
            log(f"skip EP={ep}: {n_gpus} GPU(s)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "records.json"
            if ep == 1:  # one process: run here (a one-rank group), no launcher start-up
                start = time.perf_counter()
                worker(argparse.Namespace(**{**vars(args), "worker": str(out)}))
                records += json.loads(out.read_text())
                log(f"EP=1 done in {time.perf_counter() - start:.1f}s")
                continue
            fwd = ["--topk", args.topk, "--layers", args.layers, "--hidden", str(args.hidden),
                   "--experts", str(args.experts), "--ratio", str(args.ratio),
                   "--tokens", str(args.tokens), "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--dtype", args.dtype]
            if args.capacity is not None:
                fwd += ["--capacity", str(args.capacity)]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ep}", str(Path(__file__).resolve()), *fwd,
                   "--worker", str(out)]
            env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                     str(max(1, (os.cpu_count() or 1) // ep)))}
            for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(var, None)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                log(f"EP={ep} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                return 1
            records += json.loads(out.read_text())
            log(f"EP={ep} done in {time.perf_counter() - start:.1f}s")
    proj = projection(ints(args.topk), 64, 0.25, args.proj_tflops)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records + proj, indent=1))
    if args.plot:
        plot(records, args.plot)
    print_tables(records, proj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
