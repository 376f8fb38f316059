"""Layer-level MoE checks under torchrun (4 processes, gloo, fp32); writes a JSON report.

    torchrun --standalone --nproc-per-node=4 tests/distributed/moe_layer_check.py OUT.json

One process group, megatron's model-parallel groups rebuilt for each layout (EP=1, EP=2,
EP=4, TP=2 x EP=2 with sequence parallelism).  Every rank owns fixed tokens ``x_r`` and an
upstream gradient ``g_r`` (seeded by its global rank); the layer weights come from
``models/init.py`` (keyed by checkpoint name and GLOBAL expert index), so every layout starts
from identical weights.  For each layout and layer type we record, against EP=1:

* outputs on each rank's tokens (dropless routing: must be identical);
* gradients: router and BigMac projections (local tokens only, so equal per rank), experts
  (the EP=1 gradients summed over the ranks whose tokens the expert serves, i.e. the EP group,
  sliced to the local experts);
* with a capacity factor: outputs again (megatron-core drops per source rank, before dispatch)
  and the fraction of dropped assignments (to show dropping happened);
* all-to-all bytes from the counters vs the exact count from the routing map, and bigmac /
  fine_grained bytes for the same tokens and routing;
* the load-balancing loss gradient under TP=2 x SP against one rank holding both halves;
* the bf16 and fp8 wire formats at EP=2 and EP=4: bytes per phase, error against EP=1;
* the fused (un)permutation kernels (``dcca_kernel=triton``; Triton's interpreter on CPU) at
  EP=2 and TP=2 x EP=2, dropless and with a capacity factor: the same diffs against the
  unfused EP=1 run, so the kernels' slot order holds across the all-to-all.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

S, B, H = 16, 2, 64
E, TOPK, RATIO = 8, 2, 0.25


def model_cfg(layer: str, capacity=None, aux=0.0, shared=0, activation="swiglu", z=None):
    from plt_train.config.schema import ModelConfig, MoEConfig
    return ModelConfig(num_layers=2, hidden_size=H, num_attention_heads=4, seq_length=S,
                       moe=MoEConfig(layer=layer, num_experts=E, top_k=TOPK, ratio=RATIO,
                                     capacity_factor=capacity, aux_loss_coeff=aux,
                                     num_shared_experts=shared, activation=activation,
                                     z_loss_coeff=z))


def build(model, tp: int, ep: int, dev):
    """The MoE layer alone, weights from init_weights (layout independent)."""
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.config.schema import ParallelConfig
    from plt_train.models.init import init_weights
    from plt_train.models.moe import mlp_spec
    from plt_train.runtime.device import megatron_device_kwargs

    par = ParallelConfig(tensor=tp, expert=ep, sequence_parallel=tp > 1)
    tc = to_transformer_config(model, par, torch.float32, megatron_device_kwargs(dev))
    layer = build_module(mlp_spec(model), config=tc)
    layer.set_layer_number(1)
    init_weights([layer], seed=7, std=0.1, num_layers=2)  # std 0.1: routing far from ties
    return layer


def tokens(rank: int, what: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + (1 if what == "x" else 2))
    return torch.randn(S, B, H, generator=g)


def run_layer(layer, x, g):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    layer.a2a.reset()
    out, _ = layer(x)
    (out * g).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()
             if p.grad is not None}
    return out.detach(), grads, x.grad.detach(), layer.a2a.snapshot()


def setup(dev, tp: int, ep: int):
    from plt_train.runtime import destroy_distributed, init_distributed
    from plt_train.runtime import set_seed
    destroy_distributed()
    init_distributed(dev, tp=tp, ep=ep)
    set_seed(0)


def gather(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def routed_rows(layer, x) -> tuple:
    """(rows this rank sends in dispatch: its assignments to experts on other EP ranks, rows
    it sends back in combine: other ranks' assignments to its experts), from the router's
    routing map."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        _, routing_map = layer.router(x)
    per_expert = routing_map.sum(0).long()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    n_local = E // ep
    local = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
    sent = per_expert.sum() - per_expert[local].sum()
    counts = gather(per_expert)
    group = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
    received = sum(counts[r][local].sum() for r in group if r != dist.get_rank())
    return int(sent), int(received)


def expected_phase_bytes(layer, x, width: int, wire_format: str) -> dict:
    """Bytes per phase from the routing map and the wire format: the backward of an
    all-to-all is the reverse one, so the dispatch's gradient goes back over the combine's
    rows and vice versa."""
    from plt_train.models.moe import wire

    sent, received = routed_rows(layer, x)
    rows = {"dispatch_fwd": sent, "combine_fwd": received, "dispatch_bwd": received,
            "combine_bwd": sent}
    out = {}
    for phase, n in rows.items():
        name, direction = phase.split("_")
        fmt = wire.phase_formats(wire_format, name)[direction == "bwd"]
        out[phase] = n * wire.row_bytes(width, fmt, 4)
    return out


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_wire_formats(report, model, dev, x, g, ref_out, ref_grads, ref_xgrad) -> None:
    """bf16 and fp8 on the wire at EP=2 and EP=4 (dropless): bytes per phase as the format
    says, outputs and gradients within the format's rounding of the exact EP=1 run, and EP=2
    and EP=4 computing the same outputs (every routed row is rounded once, wherever it goes)."""
    rank = dist.get_rank()
    layer_type = model.moe.layer
    width = H if layer_type == "fine_grained" else int(RATIO * H)
    for fmt in ("bf16", "fp8"):
        wired = dataclasses.replace(model, moe=dataclasses.replace(model.moe, wire_format=fmt))
        outs = {}
        for ep in (2, 4):
            setup(dev, 1, ep)
            layer = build(wired, 1, ep, dev)
            out, grads, xgrad, snap = run_layer(layer, x, g)
            outs[ep] = out
            rec = {"out_rel": relative(out, ref_out), "x_grad_rel": relative(xgrad, ref_xgrad),
                   "projection_grad_rel": {n: relative(t, ref_grads[n]) for n, t in grads.items()
                                           if n.startswith(("router", "linear_"))},
                   "phases": {p: v["wire_bytes"] for p, v in snap["phases"].items()},
                   "expected_phases": expected_phase_bytes(layer, x, width, fmt)}
            if ep == 4:
                rec["out_vs_ep2"] = maxdiff(out, outs[2])
            report["wire"].setdefault(f"{layer_type}|{fmt}|ep{ep}", {})[f"rank{rank}"] = rec


def diffs_to(reference, out, grads, xgrad, ep: int) -> dict:
    """Max abs differences from the EP=1 run: outputs, input gradient, and each parameter's
    gradient (experts: the EP=1 gradients summed over this EP group, sliced to the local
    experts)."""
    from megatron.core import parallel_state as ps

    ref_out, ref_grads, ref_xgrad, expert_ref = reference
    group = dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
    n_local = E // ep
    lo = ps.get_expert_model_parallel_rank() * n_local
    diffs = {"out": maxdiff(out, ref_out), "x_grad": maxdiff(xgrad, ref_xgrad)}
    for n, t in grads.items():
        if n in expert_ref:
            want = sum(expert_ref[n][r] for r in group)[lo:lo + n_local]
        else:
            want = ref_grads[n]
        diffs[f"grad:{n}"] = maxdiff(t, want)
    return diffs


def main(out_path: str) -> None:
    from megatron.core import parallel_state as ps

    from plt_train.runtime import detect_device, destroy_distributed, init_distributed

    dev = detect_device()
    init_distributed(dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "run with 4 processes"
    x, g = tokens(rank, "x"), tokens(rank, "g")
    report: dict = {"layouts": {}, "routing": {}, "bytes": {}, "capacity": {}, "aux_tp": {},
                    "wire": {}, "fused": {}}

    for layer_type in ("fine_grained", "bigmac"):
        for capacity in (None, 1.2):
            model = model_cfg(layer_type, capacity=capacity)
            setup(dev, 1, 1)
            ref = build(model, 1, 1, dev)
            ref_out, ref_grads, ref_xgrad, _ = run_layer(ref, x, g)
            with torch.no_grad():
                _, ref_rmap = ref.router(x)
            if capacity is not None:
                kept = ref_rmap.sum().item() / (S * B * TOPK)
                report["capacity"].setdefault(layer_type, {})["kept_fraction_rank%d" % rank] = kept
            expert_ref = {n: gather(t) for n, t in ref_grads.items() if ".experts." in f".{n}"}
            for tp, ep in ((1, 2), (1, 4), (2, 2)):
                if capacity is not None and tp > 1:
                    continue  # capacity is per rank's tokens: SP changes them (see report)
                setup(dev, tp, ep)
                layer = build(model, tp, ep, dev)
                out, grads, xgrad, snap = run_layer(layer, x, g)
                reference = (ref_out, ref_grads, ref_xgrad, expert_ref)
                key = f"{layer_type}|cap={capacity}|tp{tp}_ep{ep}"
                report["layouts"].setdefault(key, {})[f"rank{rank}"] = diffs_to(
                    reference, out, grads, xgrad, ep)
                if tp == 1:  # the same tokens in the same shapes as EP=1: the same routing
                    with torch.no_grad():
                        _, rmap = layer.router(x)
                    report["routing"].setdefault(key, {})[f"rank{rank}"] = bool(
                        torch.equal(rmap, ref_rmap))
                if ep == 2:
                    fused = dataclasses.replace(model, moe=dataclasses.replace(
                        model.moe, dcca_kernel="triton"))
                    fused_layer = build(fused, tp, ep, dev)
                    f_out, f_grads, f_xgrad, _ = run_layer(fused_layer, x, g)
                    report["fused"].setdefault(key, {})[f"rank{rank}"] = {
                        "fused_kernels": fused_layer.fused_kernels,
                        **diffs_to(reference, f_out, f_grads, f_xgrad, ep)}
                if capacity is None and tp == 1:
                    width = H if layer_type == "fine_grained" else int(RATIO * H)
                    rows = sum(routed_rows(layer, x))
                    report["bytes"].setdefault(f"{layer_type}|ep{ep}", {})[f"rank{rank}"] = {
                        "measured": snap["a2a_bytes"], "phases": snap["phases"],
                        "expected_from_routing": rows * width * 4 * 2,  # fp32, fwd + bwd
                    }
            if capacity is None:
                check_wire_formats(report, model, dev, x, g, ref_out, ref_grads, ref_xgrad)

    # Load-balancing and z-loss gradients under TP=2 x SP: the two TP ranks route the two halves of
    # one sequence; reference: one rank routing the whole sequence (EP=1, TP=1).
    model = model_cfg("fine_grained", aux=1.0, z=1.0)
    zero = torch.zeros(S, B, H)
    setup(dev, 2, 2)
    layer = build(model, 2, 2, dev)
    tp_group = ps.get_tensor_model_parallel_group()
    tp_ranks = dist.get_process_group_ranks(tp_group)
    full = torch.cat([tokens(r, "x") for r in tp_ranks], dim=0)  # [2S, B, H]
    half = full.chunk(2)[ps.get_tensor_model_parallel_rank()]
    _, grads, _, _ = run_layer(layer, half, zero)
    router_grad = grads["router.weight"].clone()
    dist.all_reduce(router_grad, group=tp_group)  # what finalize_model_grads does under SP
    setup(dev, 1, 1)
    ref = build(model, 1, 1, dev)
    _, ref_grads, _, _ = run_layer(ref, full, torch.zeros_like(full))
    report["aux_tp"][f"rank{rank}"] = {
        "tp2_sum_norm": router_grad.norm().item(),
        "tp1_norm": ref_grads["router.weight"].norm().item(),
        "diff": maxdiff(router_grad, ref_grads["router.weight"])}

    destroy_distributed()
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        merged: dict = {}
        for rep in reports:
            for section, entries in rep.items():
                for key, val in entries.items():
                    merged.setdefault(section, {}).setdefault(key, {}).update(val)
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
