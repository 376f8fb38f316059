"""BigMac's end-to-end training speed-up over fine-grained MoE, on an emulated multi-node cluster.

    python scripts/bench_cluster.py                           # the full sweep (~1.5 h, 2 cores)
    python scripts/bench_cluster.py --ep 2 --topk 8           # one slice of it
    python scripts/bench_cluster.py --tiny                    # a minute: the CI test's setting

Every run is the real training job (``launch/torchrun.sh`` -> ``plt_train.train``) on EP
emulated nodes, one process per node, the nodes joined by links shaped with ``tc tbf``
(``plt_train/runtime/emulated_cluster.py``), so every byte between ranks (the MoE all-to-alls,
the data-parallel gradient all-reduce, the token-count exchanges) crosses a link of the set rate.

Layers, all at the same ACTIVE parameters (the paper's comparison): ``fine_grained`` (CDAC) and
``bigmac`` (DCCA) with 64 experts, top-4 and top-8, r = 0.25, capacity factor 1.2, aux loss 1e-3;
``dense``, a SwiGLU MLP of width 8 * r * h (top-8's active width).  Expert parallelism over all
ranks (EP = nodes = data-parallel size), a fixed number of tokens per rank (weak scaling).

Link rates.  On the paper's testbed (32 PCIe GPUs, 100 Gb/s InfiniBand) the all-to-all took
60-92 % of the fine-grained step.  These CPUs compute about four orders of magnitude slower than
those GPUs, so the same shares appear at tens to hundreds of Mbit/s.  The rates are not guessed:
for each (EP, top-k), an unshaped fine-grained run measures the step time outside the all-to-all
(T_rest) and the all-to-all bytes per step (B); the rate that makes the all-to-all a share s of
the step is B / (s / (1 - s) * T_rest), computed for ``--shares`` (default 0.6, 0.75, 0.9) and
rounded to two significant digits.  ``--rates`` gives them explicitly instead.

Per run: ``--steps`` optimizer steps; the first ``--steps - --timed`` are warm-up and the rest are
timed (median).  ``step_ms``: the step's wall time; ``a2a_ms``: time inside the all-to-all calls
(mean over ranks; on gloo the calls block, so this is wall time, including waiting for a slower
peer); ``a2a_bytes``: bytes this rank sent to other ranks per step (mean over ranks);
``a2a_share`` = a2a_ms / step_ms.

The Table 3 projection beside each speed-up: the paper's all-to-all volume for this shape
(``plt_train.models.moe.flops.paper_table3``: balanced, dropless routing) sent at the link rate,
plus each layer's own measured step time outside the all-to-all on the unshaped run:
    projected = (T_rest[fg] + B3[fg] / rate) / (T_rest[bigmac] + B3[bigmac] / rate)
What the projection leaves out, and the measurement has: the data-parallel gradient all-reduce
over the same links (the dense rows measure it for the dense model, whose replicated MLP makes
it about twice the MoE models'), bytes that the capacity factor drops or that routing keeps on
the local rank, ranks waiting for each other, and how well the transport uses the link.  So a
second projection (``T3, rest``) keeps Table 3's all-to-all bytes but takes each layer's
measured time outside the all-to-all AT the rate (all-reduce included): what remains between it
and the measurement is the all-to-all itself.  ``link use`` = the measured all-to-all bytes at
the link rate over the measured all-to-all time (1.0: the link is full the whole time).
``bytes only`` is the ceiling that the byte ratio alone allows (Amdahl): with fine_grained's
all-to-all a share s of its step and bigmac sending a fraction b of its bytes, shrinking that
share by b and nothing else gives 1 / (1 - s + b s): 1.82x at s = 0.6 and b = 1/4, and 2.45x
(the bottom of the paper's top-8 range) only from s = 0.79 on.

Outputs: a table (printed last), ``--out`` JSON (a list of records: layer, ep, nodes, topk,
link_mbit (null = unshaped), tokens_per_s, step_ms, a2a_ms, a2a_bytes, a2a_share, device, ...;
then ``speedup`` records) and ``--plot`` PNG.  Every setting it relies on is pinned below
(``MODEL``, ``MOE``, ``TRAIN``), so a change of the project's defaults does not change what it
measures.
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

# Pinned: the model (4 layers, h = 512: r*h = 128 per expert), a 1024-token BPE (the embedding's
# gradient all-reduce would otherwise outweigh the all-to-all at this width, which the paper's
# h = 2048, 24-layer models never see), the MoE recipe of the paper, and the training step.
MODEL = {"model": "small", "model.num_layers": 4, "model.hidden_size": 512,
         "model.num_attention_heads": 8, "model.num_query_groups": None, "model.seq_length": 256,
         "data.vocab_size": 1024, "model.vocab_size": None}
MOE = {"model.moe.num_experts": 64, "model.moe.ratio": 0.25, "model.moe.capacity_factor": 1.2,
       "model.moe.aux_loss_coeff": 1e-3, "model.moe.wire_format": "native"}
TRAIN = {"train.micro_batch_size": 4, "train.seed": 1234, "optim.lr": 1e-4, "optim.min_lr": 1e-5,
         "optim.warmup_steps": 1, "model.attention_dropout": 0.0, "model.hidden_dropout": 0.0,
         "train.precision": "fp32",
         "logging.wandb": False, "train.eval_interval": 0, "train.log_interval": 1,
         "checkpoint.save_interval": 0, "checkpoint.save_at_end": False,
         "checkpoint.resume": False, "sample.prompt": None}
MICRO_BATCHES = 2  # per rank and step: the gradient all-reduce is amortised over two
# The nodes' largest TCP buffers (MiB; 0 = the kernel's 4 / 6 MiB): see emulated_cluster.
SOCKET_BUFFER_MIB = 64
TINY_MODEL = {"model": "debug", "model.num_layers": 2, "model.hidden_size": 64,
              "model.num_attention_heads": 4, "model.num_query_groups": None,
              "model.seq_length": 64, "data.vocab_size": 1024, "model.vocab_size": None}
LAYERS = ("dense", "fine_grained", "bigmac")


def log(msg: str) -> None:
    print(f"[bench_cluster] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", default="2,4", help="expert-parallel sizes = emulated nodes")
    p.add_argument("--topk", default="4,8")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--shares", default="0.6,0.75,0.9",
                   help="target all-to-all shares of the fine-grained step (rates calibrated)")
    p.add_argument("--rates", default=None,
                   help="explicit link rates in Mbit/s instead of --shares (comma list)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timed", type=int, default=3, help="last steps timed (median)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--socket-buffer-mib", type=int, default=SOCKET_BUFFER_MIB,
                   help="the nodes' largest TCP send/receive buffers (0: the kernel's)")
    p.add_argument("--tiny", action="store_true", help="debug model, EP 2, top-8, one rate")
    p.add_argument("--work-dir", default="outputs/bench_cluster")
    p.add_argument("--out", default="docs/results/bench_cluster.json")
    p.add_argument("--plot", default="docs/results/bench_cluster.png")
    p.add_argument("--report", default=None,
                   help="no runs: recompute speed-ups, tables and plot from this JSON")
    args = p.parse_args(argv)
    if args.tiny:
        args.ep, args.topk, args.shares, args.steps, args.timed = "2", "8", "0.75", 3, 2
    if args.timed >= args.steps:
        p.error("--timed must be below --steps (the first steps are warm-up)")
    return args


def shape(args) -> dict:
    """The pinned model settings of this sweep."""
    return TINY_MODEL if args.tiny else MODEL


def device_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores shared by all nodes; gloo over veth + tc tbf"


def overrides(layer: str, ep: int, topk: int, args, run_dir: Path) -> list[str]:
    """Hydra overrides of one run: every setting pinned."""
    model = shape(args)
    settings = {**model, **TRAIN, "run_dir": str(run_dir), "name": f"bench_cluster_{layer}",
                "train.steps": args.steps, "parallel": "data", "parallel.expert": ep,
                "train.global_batch_size": TRAIN["train.micro_batch_size"] * MICRO_BATCHES * ep,
                "moe": layer}
    if layer == "dense":
        settings.update({"parallel.expert": 1, "model.ffn_hidden_size":
                         int(8 * MOE["model.moe.ratio"] * model["model.hidden_size"])})
    else:
        settings.update({**MOE, "model.moe.top_k": topk})
    out = []
    for key, value in settings.items():
        value = "null" if value is None else value
        value = str(value).lower() if isinstance(value, bool) else value
        out.append(f"{key}={value}")
    return out


def run(layer: str, ep: int, topk, rate, args) -> dict:
    """One training run on ``ep`` emulated nodes; the record of its timed steps."""
    from plt_train.runtime.emulated_cluster import LinkShape, run_on_cluster

    tag = f"{layer}_ep{ep}_top{topk or 0}_{'unshaped' if rate is None else f'{rate:g}mbit'}"
    run_dir = Path(args.work_dir).resolve() / tag
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"),
           *overrides(layer, ep, topk, args, run_dir)]
    env = {"NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "PYTHON": sys.executable}
    start = time.perf_counter()
    with open(run_dir / "nodes.log", "w") as logf:
        codes = run_on_cluster(ep, cmd, LinkShape(rate), timeout=args.timeout, extra_env=env,
                               log=logf, cwd=str(REPO),
                               socket_buffer_mib=args.socket_buffer_mib or None)
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"{tag} failed (exit codes {codes}): see {run_dir / 'nodes.log'}")
    from plt_train.training.loggers import read_metrics

    trained = read_metrics(run_dir, "train")
    timed = trained[-args.timed:]
    step_ms = statistics.median(r["step_ms"] for r in timed)
    a2a_ms = statistics.median(r.get("a2a_ms", 0.0) for r in timed)
    tokens = TRAIN["train.micro_batch_size"] * MICRO_BATCHES * ep * \
        shape(args)["model.seq_length"]
    rec = {"layer": layer, "ep": ep, "nodes": ep, "topk": topk, "link_mbit": rate,
           "tokens_per_s": tokens / (step_ms / 1e3), "step_ms": step_ms, "a2a_ms": a2a_ms,
           "a2a_ms_max": statistics.median(r.get("a2a_ms_max", 0.0) for r in timed),
           "a2a_bytes": statistics.mean(r.get("a2a_MB", 0.0) for r in timed) * 2**20,
           "a2a_share": a2a_ms / step_ms, "losses": [r["loss"] for r in trained],
           "tokens_per_step": tokens, "wall_s": wall, "device": device_line(),
           "socket_buffer_mib": args.socket_buffer_mib or None,
           "timed_steps": len(timed), "overrides": overrides(layer, ep, topk, args, run_dir)}
    log(f"{tag}: step {step_ms:,.0f} ms, a2a {a2a_ms:,.0f} ms ({100 * rec['a2a_share']:.0f} %), "
        f"{rec['a2a_bytes'] / 2**20:.1f} MiB/step, {rec['tokens_per_s']:,.0f} tok/s "
        f"(run {wall:.0f} s)")
    return rec


def calibrate(unshaped_fg: dict, shares: list[float]) -> list[float]:
    """Link rates (Mbit/s) at which fine-grained's all-to-all would take each share of its step:
    the bytes it sends per step over s / (1 - s) times its step time outside the all-to-all."""
    rest_s = (unshaped_fg["step_ms"] - unshaped_fg["a2a_ms"]) / 1e3
    rates = []
    for s in shares:
        mbit = unshaped_fg["a2a_bytes"] * 8 / 1e6 / (s / (1 - s) * rest_s)
        rates.append(float(f"{mbit:.2g}"))
    return rates


def table3_bytes(layer: str, ep: int, topk: int, tokens_per_rank: int, args) -> float:
    """The paper's all-to-all bytes per rank and step for this shape (fp32 on the wire)."""
    from plt_train.models.moe.flops import paper_table3

    model = shape(args)
    t3 = paper_table3(layer, b=1, s=tokens_per_rank, l=model["model.num_layers"],
                      h=model["model.hidden_size"], v=model["data.vocab_size"],
                      e=MOE["model.moe.num_experts"], top_k=topk, r=MOE["model.moe.ratio"],
                      ep=ep)
    return t3.a2a_elements * 4


def speedups(records: list[dict], args) -> list[dict]:
    """bigmac / fine_grained per (ep, topk, link), with the Table 3 projection beside it."""
    out = []
    by_key = {(r["layer"], r["ep"], r["topk"], r["link_mbit"]): r for r in records}
    for (layer, ep, topk, rate), fg in by_key.items():
        bm = by_key.get(("bigmac", ep, topk, rate))
        if layer != "fine_grained" or bm is None:
            continue
        row = {"kind": "speedup", "ep": ep, "topk": topk, "link_mbit": rate,
               "fine_grained_a2a_share": fg["a2a_share"],
               "measured": fg["step_ms"] / bm["step_ms"],
               "a2a_bytes_ratio": bm["a2a_bytes"] / fg["a2a_bytes"] if fg["a2a_bytes"] else None}
        if row["a2a_bytes_ratio"]:
            # Amdahl with bytes alone: if only fine_grained's all-to-all time (a share s of its
            # step) shrank by the byte ratio and nothing else changed, the speed-up would be
            # 1 / (1 - s + ratio * s): 1.82x at s = 0.6 for r = 1/4, 2.45x needs s >= 0.79.
            share, ratio = fg["a2a_share"], row["a2a_bytes_ratio"]
            row["bytes_only_bound"] = 1 / (1 - share + ratio * share)
        base_fg = by_key.get(("fine_grained", ep, topk, None))
        base_bm = by_key.get(("bigmac", ep, topk, None))
        if base_fg and base_bm and rate is not None:
            per_rank = fg["tokens_per_step"] // ep
            rest = {n: (b["step_ms"] - b["a2a_ms"]) / 1e3
                    for n, b in (("fine_grained", base_fg), ("bigmac", base_bm))}
            t = {n: rest[n] + table3_bytes(n, ep, topk, per_rank, args) * 8 / (rate * 1e6)
                 for n in rest}
            row["projected_table3"] = t["fine_grained"] / t["bigmac"]
            # The same, with each layer's measured time outside the all-to-all AT this rate
            # (its gradient all-reduce crosses the same links): what is left between this and
            # the measurement is the all-to-all itself (bytes and transport).
            at_rate = {n: (b["step_ms"] - b["a2a_ms"]) / 1e3
                       + table3_bytes(n, ep, topk, per_rank, args) * 8 / (rate * 1e6)
                       for n, b in (("fine_grained", fg), ("bigmac", bm))}
            row["projected_table3_rest_at_rate"] = at_rate["fine_grained"] / at_rate["bigmac"]
            row["a2a_efficiency"] = {  # Table 3 bytes at the link rate / measured a2a time
                n: table3_bytes(n, ep, topk, per_rank, args) * 8 / (rate * 1e6)
                / (b["a2a_ms"] / 1e3) for n, b in (("fine_grained", fg), ("bigmac", bm))}
            row["measured_bytes_at_rate_over_a2a_ms"] = {
                n: b["a2a_bytes"] * 8 / (rate * 1e6) / (b["a2a_ms"] / 1e3)
                for n, b in (("fine_grained", fg), ("bigmac", bm))}
        dense = by_key.get(("dense", ep, None, rate))
        dense0 = by_key.get(("dense", ep, None, None))
        if dense and dense0:  # the dense model's gradient all-reduce at this rate
            row["dense_step_ms"] = dense["step_ms"]
            row["allreduce_ms_at_rate"] = dense["step_ms"] - dense0["step_ms"]
        out.append(row)
    return out


def plot(records: list[dict], speed: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"dense": "k:", "fine_grained": "o-", "bigmac": "s-"}
    for ep in sorted({r["ep"] for r in records}):
        for topk in sorted({r["topk"] for r in records if r["topk"]}):
            for layer in LAYERS:
                pts = sorted((r["link_mbit"], r["step_ms"]) for r in records
                             if r["layer"] == layer and r["ep"] == ep and r["link_mbit"]
                             and (r["topk"] == topk or layer == "dense"))
                if pts and not (layer == "dense" and topk != max(
                        r["topk"] for r in records if r["topk"])):
                    lbl = f"{layer} EP{ep}" + ("" if layer == "dense" else f" top-{topk}")
                    ax1.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], styles[layer],
                             label=lbl, alpha=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("link rate per node and direction (Mbit/s)")
    ax1.set_ylabel("training step (s)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    shaped = [s for s in speed if s["link_mbit"]]
    for s in shaped:
        c = "tab:blue" if s["topk"] == 8 else "tab:orange"
        m = "o" if s["ep"] == 2 else "^"
        ax2.scatter(100 * s["fine_grained_a2a_share"], s["measured"], color=c, marker=m)
        if "projected_table3" in s:
            ax2.scatter(100 * s["fine_grained_a2a_share"], s["projected_table3"], color=c,
                        marker=m, facecolors="none")
    ax2.axhspan(2.45, 3.07, color="tab:blue", alpha=0.1, label="paper, top-8 (2.45-3.07x)")
    ax2.axhspan(1.53, 2.41, color="tab:orange", alpha=0.1, label="paper, top-4 (1.53-2.41x)")
    ax2.set_xlabel("all-to-all share of the fine-grained step (%)")
    ax2.set_ylabel("bigmac speed-up over fine_grained")
    ax2.set_title("filled: measured; open: Table 3 projection; o EP2, ^ EP4; blue top-8",
                  fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(records: list[dict], args) -> None:
    """Speed-ups and projections from the run records: JSON (runs, then speed-ups), plot,
    and the two tables."""
    speed = speedups(records, args)
    Path(args.out).write_text(json.dumps(records + speed, indent=1))
    if args.plot:
        plot(records, speed, Path(args.plot))
    print(f"\n== {records[0]['device'] if records else device_line()}")
    print(f"{'layer':13} {'EP':>2} {'top':>3} {'link':>9} {'step ms':>9} {'a2a ms':>8} "
          f"{'share':>6} {'a2a MiB':>8} {'tok/s':>7}")
    for r in records:
        link = "unshaped" if r["link_mbit"] is None else f"{r['link_mbit']:g} Mb"
        print(f"{r['layer']:13} {r['ep']:>2} {r['topk'] or '-':>3} {link:>9} "
              f"{r['step_ms']:9,.0f} {r['a2a_ms']:8,.0f} {100 * r['a2a_share']:5.0f}% "
              f"{r['a2a_bytes'] / 2**20:8.1f} {r['tokens_per_s']:7,.0f}")
    print(f"\n{'EP':>2} {'top':>3} {'link':>9} {'fg a2a share':>12} {'speed-up':>8} "
          f"{'bytes only':>10} {'Table 3':>7} {'T3, rest':>9} {'bytes':>6} {'link use':>9} "
          f"{'dense AR ms':>11}")
    for s in speed:
        link = "unshaped" if s["link_mbit"] is None else f"{s['link_mbit']:g} Mb"
        proj = f"{s['projected_table3']:.2f}x" if "projected_table3" in s else "-"
        proj_ar = (f"{s['projected_table3_rest_at_rate']:.2f}x"
                   if "projected_table3_rest_at_rate" in s else "-")
        ar = f"{s['allreduce_ms_at_rate']:,.0f}" if "allreduce_ms_at_rate" in s else "-"
        ratio = f"{s['a2a_bytes_ratio']:.3f}" if s["a2a_bytes_ratio"] else "-"
        m = s.get("measured_bytes_at_rate_over_a2a_ms")
        use = f"{m['fine_grained']:.2f}/{m['bigmac']:.2f}" if m else "-"
        bound = f"{s['bytes_only_bound']:.2f}x" if "bytes_only_bound" in s else "-"
        print(f"{s['ep']:>2} {s['topk']:>3} {link:>9} {100 * s['fine_grained_a2a_share']:11.0f}% "
              f"{s['measured']:7.2f}x {bound:>10} {proj:>7} {proj_ar:>9} {ratio:>6} {use:>9} "
              f"{ar:>11}")


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        report([r for r in json.loads(Path(args.report).read_text()) if "layer" in r], args)
        return 0
    from plt_train.runtime.emulated_cluster import unavailable_reason
    from plt_train.runtime.quiet import quiet_start

    quiet_start()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"[bench_cluster] cannot emulate a cluster here: {reason}")
    layers = args.layers.split(",")
    shares = [float(s) for s in args.shares.split(",")]
    explicit = [float(r) for r in args.rates.split(",")] if args.rates else None
    records: list[dict] = []

    def save():  # after every run: a partial sweep is kept
        Path(args.out).write_text(json.dumps(records + speedups(records, args), indent=1))

    for ep in [int(e) for e in args.ep.split(",")]:
        dense_rates: set = set()
        for topk in [int(k) for k in args.topk.split(",")]:
            base = run("fine_grained", ep, topk, None, args)
            records.append(base)
            rates = explicit or calibrate(base, shares)
            log(f"EP={ep} top-{topk}: link rates {rates} Mbit/s "
                f"({'given' if explicit else f'for a2a shares {shares} of fine_grained'})")
            dense_rates |= set(rates)
            for rate in [None, *rates]:
                for layer in [x for x in layers if x != "dense"]:
                    if layer == "fine_grained" and rate is None:
                        continue
                    records.append(run(layer, ep, topk, rate, args))
                    save()
        if "dense" in layers:
            for rate in [None, *sorted(dense_rates, reverse=True)]:
                records.append(run("dense", ep, None, rate, args))
                save()
    report(records, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
