"""MoE layouts reproduce EP=1 at the LAYER level (fp32, CPU, gloo, 4 processes), both types.

``moe_layer_check.py`` runs one MoE layer at EP=1, EP=2, EP=4 and TP=2 x EP=2 (sequence
parallel) on the same tokens per rank and the same weights, and reports: outputs and
gradients against EP=1 (dropless, and with a capacity factor); all-to-all bytes against the
exact count from the routing map, and bigmac vs fine_grained for the same routing; the
aux/z-loss gradient at TP=2 against TP=1.  (Training-level parity: test_moe_parity.py.)
"""
from __future__ import annotations

import json

import pytest

from tests.helpers import torchrun_script

NPROC = 4


@pytest.fixture(scope="module")
def layer_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_layer") / "report.json"
    torchrun_script("tests/distributed/moe_layer_check.py", str(out), NPROC)
    return json.loads(out.read_text())


def test_layer_outputs_and_grads_match_ep1(layer_report):
    layouts = layer_report["layouts"]
    expected = {f"{t}|cap={c}|{l}" for t in ("fine_grained", "bigmac")
                for c, ls in (("None", ("tp1_ep2", "tp1_ep4", "tp2_ep2")),
                              ("1.2", ("tp1_ep2", "tp1_ep4"))) for l in ls}
    assert set(layouts) == expected
    for key, ranks in layouts.items():
        assert len(ranks) == NPROC
        for rank, diffs in ranks.items():
            # Same tokens, same routing: outputs equal up to the expert GEMMs' blocking (their
            # row counts differ by layout, and a matmul's blocking may change with the rows:
            # 2.2e-8 seen on one CPU); gradients up to summation order (expert gradients add
            # the EP group's tokens in another order).  fp32, outputs of order 0.1-1.
            assert diffs["out"] < 1e-6, (key, rank, diffs["out"])
            for name, d in diffs.items():
                assert d < 1e-5, (key, rank, name, d)
            assert any(n.startswith("grad:experts.") for n in diffs), diffs
            if key.startswith("bigmac"):
                assert {"grad:linear_descend.weight", "grad:linear_ascend.weight"} <= set(diffs)


def test_routing_is_exactly_ep1s(layer_report):
    """What IS guaranteed bit for bit: a rank routes its own tokens with the same router in
    the same shapes whatever the expert-parallel size, so the routing map (which tokens go to
    which experts, which drop at capacity) equals EP=1's exactly."""
    routing = layer_report["routing"]
    assert set(routing) == {f"{t}|cap={c}|tp1_ep{ep}" for t in ("fine_grained", "bigmac")
                            for c in ("None", "1.2") for ep in (2, 4)}
    assert all(len(ranks) == NPROC and all(ranks.values()) for ranks in routing.values())


def test_capacity_factor_drops_tokens_per_source_rank(layer_report):
    """With capacity 1.2 tokens really are dropped, and the outputs still match EP=1:
    megatron-core computes the capacity from each rank's own tokens before dispatch, so EP
    does not change which tokens drop (sequence parallelism does: fewer tokens per rank)."""
    kept = [v for layer in layer_report["capacity"].values() for v in layer.values()]
    assert min(kept) < 1.0 and all(0.5 < k <= 1.0 for k in kept)


def test_a2a_bytes_are_measured_and_bigmac_is_r_times_fine_grained(layer_report):
    b = layer_report["bytes"]
    for ep in (2, 4):
        fg, bm = b[f"fine_grained|ep{ep}"], b[f"bigmac|ep{ep}"]
        for rank in fg:
            for rec in (fg[rank], bm[rank]):
                assert rec["measured"] == rec["expected_from_routing"] > 0
                phases = rec["phases"]
                assert all(phases[p]["calls"] == 1 for p in phases)  # one layer, fwd + bwd
                # The backward of an all-to-all is the reverse all-to-all: the gradient of the
                # dispatch goes where the combine went, and vice versa.
                assert phases["dispatch_fwd"]["wire_bytes"] == phases["combine_bwd"]["wire_bytes"]
                assert phases["combine_fwd"]["wire_bytes"] == phases["dispatch_bwd"]["wire_bytes"]
            # Same tokens and routing (the router weights are the same draw): exactly r x.
            assert bm[rank]["measured"] * 4 == fg[rank]["measured"], (ep, rank)


def test_aux_and_z_loss_gradients_do_not_depend_on_tp(layer_report):
    for rank, rec in layer_report["aux_tp"].items():
        assert rec["tp1_norm"] > 1.0
        assert rec["diff"] <= 1e-6 * rec["tp1_norm"] * 100, rec  # ~1e-7 relative, fp32


def test_wire_formats_put_their_bytes_on_the_wire_and_round_only_that_much(layer_report):
    """``model.moe.wire_format`` bf16 / fp8 inside the real all-to-all (EP=2, EP=4, dropless):
    each phase sends exactly the format's bytes for the routed rows; outputs and gradients
    differ from the exact EP=1 run by the format's rounding and no more (bf16 ~2^-9, e4m3
    ~2^-4 relative); every routed row is rounded once, so EP=2 and EP=4 agree to fp32
    summation order, far below one rounding step."""
    wire = layer_report["wire"]
    assert set(wire) == {f"{t}|{f}|ep{ep}" for t in ("fine_grained", "bigmac")
                         for f in ("bf16", "fp8") for ep in (2, 4)}
    bound = {"bf16": (5e-4, 1e-2), "fp8": (5e-3, 0.1)}
    for key, ranks in wire.items():
        layer, fmt, ep = key.split("|")
        lo, hi = bound[fmt]
        assert len(ranks) == NPROC
        for rank, rec in ranks.items():
            assert rec["phases"] == rec["expected_phases"], (key, rank)
            assert all(v > 0 for v in rec["phases"].values())
            errors = [rec["out_rel"], rec["x_grad_rel"], *rec["projection_grad_rel"].values()]
            assert all(lo < e < hi for e in errors), (key, rank, rec)
            if layer == "bigmac":
                assert {"linear_descend.weight", "linear_ascend.weight"} <= set(
                    rec["projection_grad_rel"])
            if ep == "ep4":  # the same rounding: differences far below its step (~1e-3)
                assert rec["out_vs_ep2"] < 1e-6, (key, rank, rec["out_vs_ep2"])
            if fmt == "fp8":  # only the dispatch forward is fp8: 1 + 1/width B vs bf16's 2 B
                bf16 = wire[f"{layer}|bf16|{ep}"][rank]["phases"]
                assert rec["phases"]["combine_fwd"] == bf16["combine_fwd"]
                assert rec["phases"]["dispatch_bwd"] == bf16["dispatch_bwd"]
                width = 64 if layer == "fine_grained" else 16
                assert rec["phases"]["dispatch_fwd"] * 2 * width == (
                    bf16["dispatch_fwd"] * (width + 1))
    # Against fp32 (the "bytes" section, native format): bf16 halves every phase.
    for layer in ("fine_grained", "bigmac"):
        for ep in (2, 4):
            for rank, rec in layer_report["bytes"][f"{layer}|ep{ep}"].items():
                assert sum(wire[f"{layer}|bf16|ep{ep}"][rank]["phases"].values()) * 2 == (
                    rec["measured"])


def test_fused_kernels_across_the_all_to_all_match_ep1(layer_report):
    """``dcca_kernel=triton`` (plt_train/kernels/dcca.py, Triton's interpreter on CPU) at EP=2 and
    TP=2 x EP=2: the fused permutation / combine index the rows megatron's dispatcher sends
    and gets back, so outputs and every gradient match the unfused EP=1 run."""
    fused = layer_report["fused"]
    assert set(fused) == {f"{t}|cap={c}|{l}" for t in ("fine_grained", "bigmac")
                          for c, ls in (("None", ("tp1_ep2", "tp2_ep2")), ("1.2", ("tp1_ep2",)))
                          for l in ls}
    for key, ranks in fused.items():
        assert len(ranks) == NPROC
        for rank, diffs in ranks.items():
            assert diffs.pop("fused_kernels") is True, (key, rank)
            assert "grad:router.weight" in diffs
            assert any(n.startswith("grad:experts.") for n in diffs)
            for name, d in diffs.items():  # fp32; the kernels sum in another order
                assert d < 1e-5, (key, rank, name, d)
