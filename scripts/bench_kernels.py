"""The one kernel script a GPU session runs: checks every fused kernel against its reference
at full size, then times it against its baselines, side by side in one process.

    python scripts/bench_kernels.py                  # GPU: the issue's shapes, bf16 (minutes)
    python scripts/bench_kernels.py --small          # CPU: Triton interpreter, tiny shapes
    python scripts/bench_kernels.py --only gswa      # one section

Sections (each a function below; records carry ``section``, ``variant``, ``ms``, shapes):

* ``gswa``: G-SWA forward+backward vs PyTorch SDPA causal attention of the same shape
  (the target: at most 1.15x): ``gswa_kernel`` (the default: loop 1's branch by SDPA, the
  window branch and the gate in Triton, the window's backward in one kernel),
  ``gswa_kernel_split_bwd`` (that backward as a dQ and a dK/dV kernel) and
  ``gswa_one_kernel`` (both branches in one Triton kernel); FlexAttention causal and
  window-64 (GPU only), and the naive G-SWA (``ops.gswa``: two SDPA calls, one with a
  [S, S] band mask, and the gate mix); and forward only
  (``*_fwd``, vs SDPA's forward), to see whether a gap sits in fwd or bwd; and SDPA on the
  [s, b, h, d] views G-SWA hands it (``sdpa_causal_sbhd``), to see what the layout costs.
  Issue shape: B=4, H=16, S=4096, D=128, w=64.
* ``dcca``: BigMac's fused descend+permute and gather-sum+ascend vs the torch path, the
  fine-grained layer's full-width gather-sum combine vs megatron's ``unpermute``, and the
  whole BigMac layer forward+backward vs its expert GEMMs alone (target: at most 1.5x) and vs
  their FLOPs at the measured matmul peak, with the fine-grained layer beside it (same expert
  FLOPs); each layer unfused, with the DCCA kernels, and with those plus the fused SwiGLU
  (``model.swiglu_fusion``), which is also checked against the eager SwiGLU; and that last
  one with megatron's identity sort by local expert at EP = 1 put back (``*_sorted``).
  Issue shape: 16384 tokens, d=2048, 64 experts, top-8, r=0.25.
* ``gswa_tiles`` (only with ``--only``): G-SWA forward and backward tile sizes swept at the
  issue's shape against the default tiles (``plt_train/kernels/gswa.py``'s ``TILE_OVERRIDE``).
* ``profile`` (only with ``--only``): the largest kernels (torch.profiler) of G-SWA's default
  path and of each whole MoE layer, forward+backward: where the time over the baselines goes.
* ``decode``: one PLT decode step's attention for all R loop-rows in one launch vs the
  reference path (SDPA over loop 1's cache with rows folded into heads + one SDPA per later
  loop's window + the gate), R = 2 and 3, batch 1 and 32, a 2048-token cache.

Correctness first: each section compares the kernel (input dtype, bf16 on GPU) with its
pure-torch reference in fp32 at a checking size and records ``max_rel_err`` (NaN counts as a
failure); ``--strict`` exits 1 if any check fails.  Times are medians of ``--iters`` runs
after ``--warmup`` (CUDA events on GPU), beside ``host_ms``, the time until the call returns
on the host: where the two are close, launches and Python set the pace.  Prints a table
last, writes ``bench_kernels.json`` and ``bench_kernels.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any kernel module is imported (plt_train/kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[bench_kernels] {msg}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.machine()}, Triton interpreter)"


def timeit_host(fn, warmup: int, iters: int, device) -> tuple:
    """(median milliseconds of ``fn()``, median milliseconds until ``fn()`` RETURNS on the
    host).  On CUDA each run starts from an idle GPU (synchronized), so the first is about
    max(GPU time, host time): a host time close to it says the host's launches and Python,
    not the kernels, set the pace, and no kernel tuning shortens that row."""
    for _ in range(warmup):
        fn()
    times, host = [], []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            host.append(times[-1])
    return statistics.median(times), statistics.median(host)


def timeit(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU)."""
    return timeit_host(fn, warmup, iters, device)[0]


def fwd_bwd(fn, inputs, dy):
    """One forward + backward; returns (output, input gradients)."""
    y = fn(*inputs)
    grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)
    return y, grads


# -- G-SWA ------------------------------------------------------------------------------------
def gswa_inputs(B: int, H: int, S: int, D: int, dtype, device):
    """([q, k1, v1, k, v, gate] leaves that require grad, dy): seed 0, [S, B, H, D] layout."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    ins = [mk(S, B, H, D) for _ in range(5)]
    ins.append(torch.rand(S, B, H, 1, generator=g, device=device).to(dtype))
    return [t.requires_grad_(True) for t in ins], mk(S, B, H, D)


def section_gswa(args, device, dtype) -> list:
    from plt_train.kernels import gswa, max_rel_err
    from plt_train.models.plt import ops

    B, H, S, D, w = (1, 2, 48, 16, 8) if args.small else (4, 16, 4096, 128, 64)
    check = (1, 2, 40, 16, 8) if args.small else (1, 16, 1024, 128, 64)
    scale = D ** -0.5
    records = []

    # correctness: the kernel in the run dtype against the fp32 reference
    ins, dy = gswa_inputs(check[0], H, check[2], D, dtype, device)
    ref_in = [t.detach().float().requires_grad_(True) for t in ins]
    y_ref, grads_ref = fwd_bwd(lambda *a: ops.gswa(*a, scale, w), ref_in, dy.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, branch, backward in (("sdpa", "sdpa", "fused"), ("sdpa_split", "sdpa", "split"),
                                   ("triton", "triton", None)):
        y, grads = fwd_bwd(lambda *a: gswa.gswa_attention(
            *a, scale, w, global_branch=branch, window_backward=backward), ins, dy)
        err = max_rel_err([y, *grads], [y_ref, *grads_ref])
        records.append(dict(section="gswa", variant=f"check_{name}", max_rel_err=err,
                            tol=tol, ok=err <= tol, B=check[0], H=H, S=check[2], D=D,
                            window=w))
        log(f"gswa check ({name}): max rel err {err:.2e} (tol {tol:g})")

    # timing at the shape, fwd+bwd
    ins, dy = gswa_inputs(B, H, S, D, dtype, device)
    qt, kt, vt = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_(True)
                  for t in ins[:3])
    dyt = dy.permute(1, 2, 0, 3).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    variants = {
        "sdpa_causal": lambda: fwd_bwd(lambda q, k, v: sdpa(q, k, v, is_causal=True, scale=scale),
                                       [qt, kt, vt], dyt),
        # the same SDPA on megatron's [s, b, h, d] layout, as G-SWA's loop-1 branch calls it:
        # what the layout alone costs SDPA (the baseline above gets [b, h, s, d] contiguous)
        "sdpa_causal_sbhd": lambda: fwd_bwd(
            lambda q, k, v: ops.causal_attention(q, k, v, scale), ins[:3], dy),
        "gswa_naive": lambda: fwd_bwd(lambda *a: ops.gswa(*a, scale, w), ins, dy),
        # the default: loop 1's branch by SDPA, the window branch + gate in Triton
        "gswa_kernel": lambda: fwd_bwd(lambda *a: gswa.gswa_attention(*a, scale, w), ins, dy),
        # the same with the window branch's backward as two kernels (dQ, then dK/dV)
        "gswa_kernel_split_bwd": lambda: fwd_bwd(
            lambda *a: gswa.gswa_attention(*a, scale, w, window_backward="split"), ins, dy),
        # both branches in the one Triton kernel (global_branch="triton")
        "gswa_one_kernel": lambda: fwd_bwd(
            lambda *a: gswa.gswa_attention(*a, scale, w, global_branch="triton"), ins, dy),
    }
    if device.type == "cuda" and not args.no_flex:
        variants.update(_flex_variants(qt, kt, vt, dyt, S, w, scale))
    # Forward only (detached inputs: no graph is recorded): is a gap to the target in fwd or bwd?
    q0, k0, v0 = (t.detach() for t in (qt, kt, vt))
    fwd_ins = [t.detach() for t in ins]
    variants["sdpa_causal_fwd"] = lambda: sdpa(q0, k0, v0, is_causal=True, scale=scale)
    variants["gswa_kernel_fwd"] = lambda: gswa.gswa_attention(*fwd_ins, scale, w)
    variants["gswa_one_kernel_fwd"] = lambda: gswa.gswa_attention(*fwd_ins, scale, w,
                                                                  global_branch="triton")
    for name, fn in variants.items():
        try:
            ms, host_ms = timeit_host(fn, args.warmup, args.iters, device)
        except Exception as exc:  # a baseline that does not run here is reported, not fatal
            log(f"gswa {name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        records.append(dict(section="gswa", variant=name, ms=ms, host_ms=host_ms, B=B, H=H,
                            S=S, D=D, window=w))
        log(f"gswa {name}: {ms:.3f} ms (host {host_ms:.3f})")
    base = {r["variant"]: r["ms"] for r in records if r["variant"].startswith("sdpa_causal")}
    for r in records:
        key = "sdpa_causal_fwd" if r["variant"].endswith("_fwd") else "sdpa_causal"
        if "ms" in r and key in base:
            r["vs_baseline"] = r["ms"] / base[key]
    return records


def _flex_variants(q, k, v, dy, S, w, scale) -> dict:
    """FlexAttention causal and causal window-w (the issue's other baselines), compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, S, S, device=q.device)
    window = create_block_mask(lambda b, h, i, j: (j <= i) & (j > i - w), None, None, S, S,
                               device=q.device)

    def run(mask):
        return lambda: fwd_bwd(lambda a, b_, c: flex(a, b_, c, block_mask=mask, scale=scale),
                               [q, k, v], dy)

    return {"flex_causal": run(causal), f"flex_window{w}": run(window)}


# -- DCCA -------------------------------------------------------------------------------------
def section_dcca(args, device, dtype) -> list:
    """Components (fused vs megatron's permute/unpermute around the projections; the
    fine-grained layer's full-width combine vs ``unpermute``) and the whole BigMac and
    fine-grained layers (dcca_kernel torch vs triton) against BigMac's expert GEMMs alone."""
    import torch.nn.functional as F
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from plt_train.kernels import dcca

    T, h, E, K, r = (64, 32, 8, 2, 0.5) if args.small else (16384, 2048, 64, 8, 0.25)
    rh = int(r * h)
    check = (40, 32, 16, 8, 2) if args.small else (2048, h, rh, E, K)
    err = dcca.check_error(device, dtype, *check)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    shape = dict(T=T, h=h, experts=E, top_k=K, ratio=r)
    records = [dict(section="dcca", variant="check", max_rel_err=err, tol=tol, ok=err <= tol,
                    T=check[0], h=check[1], experts=check[3], top_k=check[4])]
    log(f"dcca check: max rel err {err:.2e} (tol {tol:g})")

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, generator=g, device=device)
    routing = torch.zeros(T, E, dtype=torch.bool, device=device).scatter(
        1, logits.topk(K, dim=1).indices, True)
    probs = logits.softmax(-1) * routing
    n_out = T * K

    def param(*shape_):
        return (torch.randn(*shape_, generator=g, device=device) * shape_[-1] ** -0.5
                ).to(dtype).requires_grad_(True)

    x, w_down, y, w_up = param(T, h), param(rh, h), param(n_out, rh), param(h, rh)
    p = probs.clone().requires_grad_(True)
    d_perm = torch.randn(n_out, rh, generator=g, device=device).to(dtype)
    d_out = torch.randn(T, h, generator=g, device=device).to(dtype)

    def descend_torch():
        z, _, _ = permute(F.linear(x, w_down), routing, num_out_tokens=n_out)
        torch.autograd.grad(z, (x, w_down), d_perm)

    def descend_fused():
        dest, _ = dcca.expert_slots(routing, p, K)
        z = dcca.descend_permute(x, w_down, dest, n_out, rows_covered=True)
        torch.autograd.grad(z, (x, w_down), d_perm)

    _, _, sorted_indices = permute(x.detach(), routing, num_out_tokens=n_out)

    def combine_torch():
        c = unpermute(y, sorted_indices, torch.Size((T, rh)), probs=p, routing_map=routing)
        torch.autograd.grad(F.linear(c, w_up), (y, p, w_up), d_out)

    def combine_fused():
        dest, slot_probs = dcca.expert_slots(routing, p, K)
        out = dcca.combine_ascend(y, slot_probs, dest, w_up, rows_covered=True)
        torch.autograd.grad(out, (y, p, w_up), d_out)

    y_full = param(n_out, h)  # the fine-grained (CDAC) layer combines at full width

    def unpermute_torch():
        c = unpermute(y_full, sorted_indices, torch.Size((T, h)), probs=p, routing_map=routing)
        torch.autograd.grad(c, (y_full, p), d_out)

    def unpermute_fused():
        dest, slot_probs = dcca.expert_slots(routing, p, K)
        c = dcca.combine(y_full, slot_probs, dest, rows_covered=True)
        torch.autograd.grad(c, (y_full, p), d_out)

    parts = [("descend_permute_torch", descend_torch), ("descend_permute_fused", descend_fused),
             ("gather_ascend_torch", combine_torch), ("gather_ascend_fused", combine_fused),
             ("unpermute_torch", unpermute_torch), ("unpermute_fused", unpermute_fused)]
    for name, fn in parts:
        ms, host_ms = timeit_host(fn, args.warmup, args.iters, device)
        records.append(dict(section="dcca", variant=name, ms=ms, host_ms=host_ms, **shape))
        log(f"dcca {name}: {ms:.3f} ms (host {host_ms:.3f})")
    base = {rec["variant"].split("_")[0]: rec["ms"] for rec in records[1:]
            if rec["variant"].endswith("_torch")}
    for rec in records[1:]:
        rec["vs_baseline"] = rec["ms"] / base[rec["variant"].split("_")[0]]
    records += _moe_layers(args, device, dtype, T, h, E, K, r, shape)
    return records


# The MoE layer variants timed: suffix -> (dcca_kernel, model.swiglu_fusion, megatron's
# identity sort at EP = 1 kept).  torch is run 1's unfused baseline (less the identity sort,
# skipped since 2026-11-27's third session), triton run 1's fused DCCA, triton_swiglu the
# default on CUDA (megatron's fused SwiGLU in the experts too), and triton_swiglu_sorted that
# default with megatron's split + cat sort by local expert put back: the skip's saving.
MOE_VARIANTS = {"torch": ("torch", "off", False), "triton": ("triton", "off", False),
                "triton_swiglu": ("triton", "on", False),
                "triton_swiglu_sorted": ("triton", "on", True)}


def _build_moe_layers(device, dtype, T, h, E, K, r):
    """({(kind, suffix): layer} at EP=1 (dropless) for each of ``MOE_VARIANTS``, the
    generator that made the input, ``layer_step(layer)``: one forward + backward of an input
    [T/4, 4, h]).  Every layer of a kind gets the first one's weights."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
    from plt_train.models.moe import mlp_spec
    from plt_train.runtime import detect_device, init_distributed
    from plt_train.runtime.device import megatron_device_kwargs

    dev = detect_device()
    init_distributed(dev)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=device))
    heads = max(1, h // 128)
    layers = {}
    for kind in ("bigmac", "fine_grained"):
        first = None
        for suffix, (kernel, fusion, sorted_) in MOE_VARIANTS.items():
            model = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=heads,
                                seq_length=T // 4, swiglu_fusion=fusion,
                                moe=MoEConfig(layer=kind, num_experts=E, top_k=K, ratio=r,
                                              capacity_factor=None, dcca_kernel=kernel))
            tc = to_transformer_config(model, ParallelConfig(), dtype,
                                       megatron_device_kwargs(dev))
            layer = build_module(mlp_spec(model), config=tc).to(device)
            layer.set_layer_number(1)
            if sorted_:  # megatron's permutation 2 and its inverse, as 0.16.1 runs them
                layer.token_dispatcher.sorts_in_place = lambda: False
            if first is None:
                first = layer
            layer.load_state_dict(first.state_dict())
            layers[kind, suffix] = layer
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T // 4, 4, h, generator=g, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(T // 4, 4, h, generator=g, device=device).to(dtype)

    def layer_step(layer):
        out, _ = layer(x)
        return out, torch.autograd.grad(out, [x, *layer.parameters()], dy, allow_unused=True)

    return layers, g, layer_step


def matmul_peak(args, device, dtype) -> float:
    """FLOP/s of one square matmul (8192 on GPU: 1.1e12 FLOPs, long enough that launch and
    timing overheads vanish; 256 with ``--small``), timed like everything else here."""
    n = 256 if args.small else 8192
    g = torch.Generator(device=device).manual_seed(2)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / (timeit(lambda: a @ b, args.warmup, args.iters, device) / 1e3)


def _moe_layers(args, device, dtype, T, h, E, K, r, shape) -> list:
    """Each whole layer forward+backward at EP=1 (dropless) for each of ``MOE_VARIANTS``,
    against BigMac's expert GEMMs on the same number of (balanced) routed rows: the issue's
    ratio.  The baseline ``expert_gemms`` is the six grouped GEMMs alone (fc1 and fc2, forward
    and both backward products); ``experts_*`` are the expert module with its SwiGLU unfused
    (run 1's "expert_gemms") and fused; ``experts_at_peak`` is their FLOPs at this card's
    measured matmul peak, the issue's own yardstick.  The fine-grained layer's experts do the
    same FLOPs (h -> r*h -> h instead of r*h -> h -> r*h), so its rows read against the same
    baselines."""
    from plt_train.kernels import max_rel_err
    from plt_train.models.moe.experts import _offsets

    layers, g, layer_step = _build_moe_layers(device, dtype, T, h, E, K, r)
    records = []
    rh, rows = int(r * h), T * K
    tokens = torch.randn(rows, rh, generator=g, device=device).to(dtype).requires_grad_(True)
    per_expert = torch.full((E,), rows // E, dtype=torch.long, device=device)
    per_expert[-1] += rows - int(per_expert.sum())
    d_tok = torch.randn_like(tokens)

    def expert_step(experts):
        out, _ = experts(tokens, per_expert)
        return out, torch.autograd.grad(out, [tokens, *experts.parameters()], d_tok)

    experts = {fusion: layers["bigmac", suffix].experts
               for fusion, suffix in (("off", "triton"), ("on", "triton_swiglu"))}
    # The fused SwiGLU against the eager one, through the whole expert module, gradients too.
    got, want = (expert_step(experts[f]) for f in ("on", "off"))
    err = max_rel_err([got[0], *got[1]], [want[0], *want[1]])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    records.append(dict(section="dcca", variant="check_swiglu_fusion", max_rel_err=err,
                        tol=tol, ok=err <= tol, **shape))
    log(f"dcca check_swiglu_fusion: max rel err {err:.2e} (tol {tol:g})")

    w1, w2 = experts["off"].linear_fc1.weight, experts["off"].linear_fc2.weight
    offs = _offsets(per_expert, device)  # the expert module's own grouped-GEMM offsets
    act = torch.randn(rows, w2.shape[1], generator=g, device=device).to(dtype)
    act.requires_grad_(True)
    d_fc1 = torch.randn(rows, w1.shape[2], generator=g, device=device).to(dtype)

    def gemm_step():
        fc1 = torch._grouped_mm(tokens, w1, offs=offs)
        torch.autograd.grad(fc1, [tokens, w1], d_fc1)
        fc2 = torch._grouped_mm(act, w2, offs=offs)
        torch.autograd.grad(fc2, [act, w2], d_tok)

    flops = 18 * rows * rh * h  # SwiGLU experts, forward + backward (3 x 2 x 3 r h^2 per row)
    peak = matmul_peak(args, device, dtype)
    base = {"experts_at_peak": flops / peak * 1e3}
    log(f"dcca matmul peak {peak / 1e12:.1f} TFLOP/s measured: the experts' {flops:.3g} FLOPs "
        f"take {base['experts_at_peak']:.3f} ms there")
    steps = {"expert_gemms": gemm_step, "experts_unfused": lambda: expert_step(experts["off"]),
             "experts_fused": lambda: expert_step(experts["on"])}
    for name, fn in steps.items():
        base[name] = timeit(fn, args.warmup, args.iters, device)
        log(f"dcca {name}: {base[name]:.3f} ms")
    gemm_ms = base["expert_gemms"]
    for name, ms in base.items():
        records.append(dict(section="dcca", variant=name, ms=ms, vs_baseline=ms / gemm_ms,
                            vs_peak=ms / base["experts_at_peak"], flops=flops,
                            peak_tflops=peak / 1e12, **shape))
    for (kind, suffix), layer in layers.items():
        ms, host_ms = timeit_host(lambda: layer_step(layer), args.warmup, args.iters, device)
        assert layer.fused_kernels == suffix.startswith("triton")
        records.append(dict(section="dcca", variant=f"{kind}_layer_{suffix}", ms=ms,
                            host_ms=host_ms, vs_baseline=ms / gemm_ms,
                            vs_peak=ms / base["experts_at_peak"], **shape))
        log(f"dcca {kind}_layer_{suffix}: {ms:.3f} ms, host {host_ms:.3f} "
            f"({ms / gemm_ms:.2f}x the expert GEMMs, "
            f"{ms / base['experts_at_peak']:.2f}x their FLOPs at peak)")
    return records


def _top_ops(name: str, step, args, device, shape: dict) -> list:
    """``step()`` under torch.profiler (CUDA kernels on CUDA, CPU ops on CPU): its 12 largest
    ops by time, each with its share of the step's total; and the step's own time without
    the profiler.  Kernel time well under the step's time means the GPU waits for the host
    (launch overhead, syncs): no kernel tuning closes that gap."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(args.iters):
            step()
        if cuda:
            torch.cuda.synchronize()

    def key(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if key(e) > 0]
    total = sum(key(e) for e in events) / args.iters / 1e3
    step_ms = timeit(step, 1, args.iters, device)
    log(f"profile {name}: {total:.3f} ms of {'kernels' if cuda else 'ops'} in a "
        f"{step_ms:.3f} ms step")
    records = []
    for e in sorted(events, key=key, reverse=True)[:12]:
        ms = key(e) / args.iters / 1e3
        records.append(dict(section="profile", variant=name, op=e.key[:80],
                            calls=e.count // args.iters, op_ms=ms, share=ms / total,
                            kernels_ms=total, step_ms=step_ms, **shape))
        log(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{e.count // args.iters:<3} {e.key[:70]}")
    return records


def section_profile(args, device, dtype) -> list:
    """Where the time over the targets' baselines goes: the largest kernels of G-SWA's default
    path (forward+backward) and of each whole MoE layer's forward+backward, for the next
    round of tuning.  Not in the default sections: ``--only profile``."""
    from plt_train.kernels import gswa

    B, H, S, D, w = (1, 2, 48, 16, 8) if args.small else (4, 16, 4096, 128, 64)
    ins, dy = gswa_inputs(B, H, S, D, dtype, device)
    records = _top_ops("gswa_kernel", lambda: fwd_bwd(
        lambda *a: gswa.gswa_attention(*a, D ** -0.5, w), ins, dy), args, device,
        dict(B=B, H=H, S=S, D=D, window=w))

    T, h, E, K, r = (64, 32, 8, 2, 0.5) if args.small else (16384, 2048, 64, 8, 0.25)
    layers, _, layer_step = _build_moe_layers(device, dtype, T, h, E, K, r)
    for (kind, suffix), layer in layers.items():
        if MOE_VARIANTS[suffix][2]:  # the identity sort's cost is the timed variants' diff
            continue
        records += _top_ops(f"{kind}_layer_{suffix}", lambda: layer_step(layer), args, device,
                            dict(T=T, h=h, experts=E, top_k=K, ratio=r))
    return records


# -- decode -----------------------------------------------------------------------------------
def section_decode(args, device, dtype) -> list:
    """One PLT layer's decode attention (all R loop-rows) at a full cache: the reference path
    (SDPA with rows folded into heads + one SDPA per later loop's window + the gate) vs the
    one-launch kernel."""
    from plt_train.kernels import max_rel_err, plt_decode
    from plt_train.models.plt import ops

    kv_heads, group, d, S, w = (1, 2, 16, 40, 8) if args.small else (4, 4, 128, 2048, 64)
    batches, loops_list = ((1,), (2,)) if args.small else ((1, 32), (2, 3))

    def inputs(B, R, dt, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        mk = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dt)  # noqa: E731
        nq = kv_heads * group
        return dict(q=mk(1, R * B, nq, d), k_full=mk(B, kv_heads, S, d),
                    v_full=mk(B, kv_heads, S, d),
                    key_valid=torch.ones(B, S, dtype=torch.bool, device=device),
                    scale=d ** -0.5, k_win=mk(R - 1, B, kv_heads, w, d),
                    v_win=mk(R - 1, B, kv_heads, w, d),
                    win_valid=torch.ones(B, w, dtype=torch.bool, device=device),
                    gate=torch.rand(1, (R - 1) * B, nq, 1, generator=g, device=device).to(dt))

    cursor = torch.tensor([S - 1], device=device)
    ins = inputs(batches[0], loops_list[-1], dtype, seed=1)
    got = plt_decode.plt_decode_attention(**ins, cursor=cursor)
    want = ops.plt_decode_attention(**{k: v.float() if torch.is_tensor(v) and
                                       v.is_floating_point() else v for k, v in ins.items()})
    err = max_rel_err(got, want)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    records = [dict(section="decode", variant="check", max_rel_err=err, tol=tol, ok=err <= tol,
                    B=batches[0], loops=loops_list[-1], cache=S, window=w)]
    log(f"decode check: max rel err {err:.2e} (tol {tol:g})")
    for B in batches:
        for R in loops_list:
            ins = inputs(B, R, dtype)
            shape = dict(B=B, loops=R, kv_heads=kv_heads, group=group, D=d, cache=S, window=w)
            ref_ms = timeit(lambda: ops.plt_decode_attention(**ins), args.warmup, args.iters,
                            device)
            ker_ms = timeit(lambda: plt_decode.plt_decode_attention(**ins, cursor=cursor),
                            args.warmup, args.iters, device)
            for name, ms in ((f"reference_B{B}_R{R}", ref_ms), (f"kernel_B{B}_R{R}", ker_ms)):
                records.append(dict(section="decode", variant=name, ms=ms,
                                    vs_baseline=ms / ref_ms, **shape))
                log(f"decode {name}: {ms:.4f} ms")
    return records


# -- G-SWA tile sweep ---------------------------------------------------------------------------
SMALL_FWD_TILES = [(16, 16, 1, 1), (32, 16, 1, 1), (32, 32, 1, 1)]
SMALL_BWD_TILES = [(16, 1, 1), (32, 1, 1)]


def section_gswa_tiles(args, device, dtype) -> list:
    """The G-SWA tiles (``kernels/gswa.py``'s ``TILE_OVERRIDE``) at the issue's shape: each
    forward tile timed forward-only, then each backward tile timed fwd+bwd with the default
    forward.  Outputs and gradients are checked against the default tiles' (same kernel, another
    tiling: bf16 rounding apart, equal).  The baseline is the default; the best gets
    ``best``.  Not in the default sections: ``--only gswa_tiles``."""
    from plt_train.kernels import gswa, max_rel_err

    B, H, S, D, w = (1, 2, 48, 16, 8) if args.small else (4, 16, 4096, 128, 64)
    scale = D ** -0.5
    ins, dy = gswa_inputs(B, H, S, D, dtype, device)
    fwd_ins = [t.detach() for t in ins]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    run = lambda: fwd_bwd(lambda *a: gswa.gswa_attention(*a, scale, w), ins, dy)  # noqa: E731
    y0, grads0 = run()
    default = gswa._blocks(ins[0], window_only=gswa.GLOBAL_BRANCH == "sdpa")
    records = []
    sweeps = (("fwd", SMALL_FWD_TILES if args.small else gswa.SWEEP_FWD_TILES),
              ("bwd", SMALL_BWD_TILES if args.small else gswa.SWEEP_BWD_TILES))
    for kind, tiles in sweeps:
        rows = []
        for tile in tiles:
            gswa.TILE_OVERRIDE.clear()
            gswa.TILE_OVERRIDE[kind] = tile
            name = f"{kind}_" + "x".join(map(str, tile))
            try:
                y, grads = run()
                err = max_rel_err([y, *grads], [y0, *grads0])
                fn = ((lambda: gswa.gswa_attention(*fwd_ins, scale, w)) if kind == "fwd"
                      else run)
                ms = timeit(fn, args.warmup, args.iters, device)
            except Exception as exc:  # e.g. out of shared memory: reported, not fatal
                log(f"gswa_tiles {name}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                continue
            finally:
                gswa.TILE_OVERRIDE.clear()
            rows.append(dict(section="gswa_tiles", variant=name, ms=ms, max_rel_err=err,
                             tol=tol, ok=err <= tol, default=tile == default[kind],
                             B=B, H=H, S=S, D=D, window=w))
            log(f"gswa_tiles {name}: {ms:.3f} ms, vs default tiles {err:.1e}")
        base = [r["ms"] for r in rows if r["default"]]
        for r in rows:
            if base:
                r["vs_baseline"] = r["ms"] / base[0]
        good = [r for r in rows if r["ok"]]
        if good:
            min(good, key=lambda r: r["ms"])["best"] = True
        records += rows
    return records


SECTIONS = {"gswa": section_gswa, "dcca": section_dcca, "decode": section_decode,
            "gswa_tiles": section_gswa_tiles, "profile": section_profile}
DEFAULT_SECTIONS = ("gswa", "dcca", "decode")


# -- report -----------------------------------------------------------------------------------
def compiled_resources() -> list:
    """Registers, spills and shared memory of every kernel this process compiled, as the
    driver reports them: the check of scripts/kernel_resources.py's static numbers.  Reads
    Triton internals (the JIT's kernel cache), so any failure only leaves the list short."""
    rows = []
    try:
        from triton.runtime.jit import JITFunction

        from plt_train.kernels import dcca, gswa, plt_decode
        for module in (gswa, dcca, plt_decode):
            for fn in vars(module).values():
                if not isinstance(fn, JITFunction):
                    continue
                for caches in fn.device_caches.values():
                    for kernel in caches[0].values():
                        meta = kernel.metadata
                        rows.append(dict(kernel=fn.__name__, num_warps=meta.num_warps,
                                         num_stages=meta.num_stages, shared_memory=meta.shared,
                                         registers=getattr(kernel, "n_regs", None),
                                         spills=getattr(kernel, "n_spills", None)))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        log(f"compiled_resources: {type(exc).__name__}: {exc}")
    return rows


def print_table(records: list) -> None:
    rows = [r for r in records if "ms" in r or "max_rel_err" in r]
    width = max([22] + [len(r["variant"]) for r in rows])
    print(f"{'section':10} {'variant':{width}} {'ms':>9} {'host ms':>9} {'x baseline':>10} "
          f"{'max rel err':>12}  ok")
    for r in rows:
        ms = f"{r['ms']:9.3f}" if "ms" in r else " " * 9
        ms += f" {r['host_ms']:9.3f}" if "host_ms" in r else " " * 10
        ratio = f"{r['vs_baseline']:10.2f}" if "vs_baseline" in r else " " * 10
        err = f"{r['max_rel_err']:12.2e}" if "max_rel_err" in r else " " * 12
        ok = ("yes" if r["ok"] else "NO") if "ok" in r else ""
        ok += "".join(f"  {tag}" for tag in ("default", "best") if r.get(tag))
        print(f"{r['section']:10} {r['variant']:{width}} {ms} {ratio} {err}  {ok}")


def plot(records: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "vs_baseline" in r]
    sections = sorted({r["section"] for r in timed})
    if not sections:
        return
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 3.5), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        rs = [r for r in timed if r["section"] == sec]
        ax.barh([r["variant"] for r in rs], [r["vs_baseline"] for r in rs], color="tab:blue")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_title(sec)
        ax.set_xlabel("time / baseline")
    fig.suptitle(records[0].get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--dtype", default=None, help="bf16 on GPU, fp32 on CPU by default")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    p.add_argument("--no-flex", action="store_true",
                   help="skip the FlexAttention baselines (their compilation takes a while)")
    p.add_argument("--out", default="outputs/bench_kernels")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        log("no GPU: running the --small shapes through the Triton interpreter")
        args.small = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    args.iters = args.iters if args.iters is not None else (2 if args.small else 20)

    stamp = dict(device=device_name(device), dtype=str(dtype).replace("torch.", ""),
                 torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    try:
        import triton
        stamp["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.only.split(","):
        t0 = time.time()
        log(f"section {name} ...")
        try:
            records += [{**r, **stamp} for r in SECTIONS[name](args, device, dtype)]
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the rest
            # Recorded as a failed check, so --strict fails and the table shows it.
            traceback.print_exc()
            records.append(dict(section=name, variant="error", ok=False, max_rel_err=float("nan"),
                                error=f"{type(exc).__name__}: {str(exc)[:300]}", **stamp))
        log(f"section {name} done in {time.time() - t0:.1f} s")
        # Written after every section: a GPU lease that ends mid-run still leaves the rest.
        (out / "bench_kernels.json").write_text(json.dumps(records, indent=1))
    if device.type == "cuda":
        compiled = compiled_resources()
        (out / "compiled_resources.json").write_text(json.dumps(compiled, indent=1))
        log(f"{len(compiled)} compiled kernels' registers/spills in compiled_resources.json")
    plot(records, out / "bench_kernels.png")
    print_table(records)
    failed = [r for r in records if r.get("ok") is False]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
