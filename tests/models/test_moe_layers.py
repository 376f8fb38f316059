"""MoE building blocks in one process: experts, the two layers against their formulas, the
aux-loss gradient, FLOPs and parameter counts (including the paper's Table 3 example)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

H, S, B = 64, 12, 3


def _model(layer="bigmac", **moe_kw) -> ModelConfig:
    moe = {"num_experts": 8, "top_k": 2, "capacity_factor": None, "aux_loss_coeff": 0.0, **moe_kw}
    return ModelConfig(num_layers=2, hidden_size=H, num_attention_heads=4, seq_length=S,
                       moe=MoEConfig(layer=layer, **moe))


def _layer(dev, model: ModelConfig, seed: int = 3):
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.models.init import init_weights
    from plt_train.models.moe import mlp_spec

    tc = to_transformer_config(model, ParallelConfig(), torch.float32, megatron_device_kwargs(dev))
    layer = build_module(mlp_spec(model), config=tc)
    layer.set_layer_number(1)
    init_weights([layer], seed=seed, std=0.1, num_layers=model.num_layers)
    return layer


# --- experts -------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_match_the_per_expert_loop(one_rank, activation, dtype):
    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.models.moe.experts import GroupedExperts

    tc = to_transformer_config(_model(), ParallelConfig(), dtype, megatron_device_kwargs(one_rank))
    grouped = GroupedExperts(4, tc, input_size=16, hidden_size=32, activation=activation,
                             gemm="grouped")
    loop = GroupedExperts(4, tc, input_size=16, hidden_size=32, activation=activation,
                          gemm="loop")
    loop.load_state_dict(grouped.state_dict())
    counts = torch.tensor([5, 0, 9, 2])  # an expert without tokens
    x = torch.randn(16, 16, dtype=dtype)
    g = torch.randn(16, 16, dtype=dtype)
    outs, grads = [], []
    for experts in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out, bias = experts(xi, counts)
        assert bias is None and out.shape == (16, 16) and out.dtype == dtype
        out.backward(g)
        outs.append(out)
        grads.append([xi.grad, experts.linear_fc1.weight.grad, experts.linear_fc2.weight.grad])
    # Two GEMM paths (torch._grouped_mm, one matmul per expert): equal up to their blocking.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)
    assert torch.count_nonzero(grads[0][1][1]) == 0  # no tokens, no gradient
    # Reference for expert 2 by hand.
    w1, w2 = loop.linear_fc1.weight[2].float(), loop.linear_fc2.weight[2].float()
    h = x[5:14].float() @ w1
    h = F.silu(h[:, :32]) * h[:, 32:] if activation == "swiglu" else F.relu(h)
    torch.testing.assert_close(outs[1][5:14].float(), h @ w2, **({} if dtype == torch.float32
                                                                   else dict(rtol=3e-2, atol=3e-2)))


def test_experts_checkpoint_keys_carry_the_global_expert_axis(one_rank):
    layer = _layer(one_rank, _model("bigmac"))
    sd = layer.sharded_state_dict(prefix="mlp.")
    fc1 = sd["mlp.experts.linear_fc1.weight"]
    assert fc1.global_shape == (8, 16, 2 * H) and fc1.global_offset == (0, 0, 0)
    assert fc1.data.data_ptr() == layer.experts.linear_fc1.weight.data_ptr()
    assert not getattr(layer.experts.linear_fc1.weight, "allreduce", True)  # expert-DP reduced
    assert {"mlp.linear_descend.weight", "mlp.linear_ascend.weight", "mlp.router.weight"} <= set(sd)


# --- the layers against their definitions ---------------------------------------------------

def _routing(layer, x):
    with torch.no_grad():
        probs, rmap = layer.router(x)
    return probs, rmap  # [T, E], gate weights zero outside the top-k


def _expert(layer, e, v):
    w1, w2 = layer.experts.linear_fc1.weight[e], layer.experts.linear_fc2.weight[e]
    h = v @ w1
    a, b = h.chunk(2, dim=-1)
    return (F.silu(a) * b) @ w2


@pytest.mark.parametrize("layer_type", ["fine_grained", "bigmac"])
def test_layer_is_the_papers_formula(one_rank, layer_type):
    """CDAC: y = sum_k p_k E_k(x).  DCCA: y = W_up sum_k p_k E_k(W_down x), router on x."""
    layer = _layer(one_rank, _model(layer_type))
    x = torch.randn(S, B, H)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    flat = x.reshape(-1, H)
    probs, rmap = _routing(layer, flat)
    assert (rmap.sum(-1) == 2).all()
    want = torch.zeros_like(flat)
    with torch.no_grad():
        v = flat @ layer.linear_descend.weight.T if layer_type == "bigmac" else flat
        acc = torch.zeros(v.shape)
        for t in range(flat.shape[0]):
            for e in rmap[t].nonzero().flatten().tolist():
                acc[t] += probs[t, e] * _expert(layer, e, v[t:t + 1])[0]
        want = acc @ layer.linear_ascend.weight.T if layer_type == "bigmac" else acc
    torch.testing.assert_close(out.reshape(-1, H).detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_type", ["dense", "fine_grained", "bigmac"])
def test_swiglu_fusion_is_used_and_changes_nothing(one_rank, layer_type, monkeypatch):
    """model.swiglu_fusion=on: megatron's fused SwiGLU (torch.compile'd; C++ on this CPU)
    runs in the dense MLP and in the routed experts (GroupedExperts._act) and gives the
    eager path's output and gradients; "off" never calls it."""
    import megatron.core.fusions.fused_bias_swiglu as fused
    import megatron.core.transformer.mlp as mlp
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.models.moe import mlp_spec

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused_impl(*args, **kwargs)

    fused_impl = fused.bias_swiglu_impl
    monkeypatch.setattr(fused, "bias_swiglu_impl", counted)  # the experts' import
    monkeypatch.setattr(mlp, "bias_swiglu_impl", counted)  # megatron's MLP's
    x = torch.randn(S, B, H)
    dy = torch.randn(S, B, H)
    results, first = [], None
    for fusion in ("off", "on"):
        model = _model(layer_type, num_shared_experts=1) if layer_type != "dense" \
            else _model("dense")
        model.swiglu_fusion = fusion
        tc = to_transformer_config(model, ParallelConfig(), torch.float32,
                                   megatron_device_kwargs(one_rank))
        layer = build_module(mlp_spec(model), config=tc)
        if layer_type != "dense":
            layer.set_layer_number(1)
        if first is None:
            first = layer
        layer.load_state_dict(first.state_dict())
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append([out, *torch.autograd.grad(out, [xi, *params], dy)])
        # dense: the MLP; MoE: the routed experts and the shared expert (megatron's MLP)
        assert len(calls) == {"off": 0, "on": 1 if layer_type == "dense" else 2}[fusion]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_type", ["fine_grained", "bigmac"])
def test_single_rank_skips_the_identity_sort_by_local_expert(one_rank, layer_type, monkeypatch):
    """At TP x EP = 1 megatron's permutation 2 and its inverse (split + cat) put every chunk
    back where it was: the dispatcher skips both (no call, the routed tokens reach the experts
    and come back without a copy), with megatron's output and gradients."""
    import megatron.core.transformer.moe.token_dispatcher as td

    from plt_train.models.moe.layer import AccountedAlltoAllDispatcher

    sorts = []

    def counted(*args, **kwargs):
        sorts.append(args[0].shape)
        return sort_impl(*args, **kwargs)

    sort_impl = td.sort_chunks_by_idxs
    monkeypatch.setattr(td, "sort_chunks_by_idxs", counted)
    layer = _layer(one_rank, _model(layer_type, num_shared_experts=1))
    x, dy = torch.randn(S, B, H), torch.randn(S, B, H)

    def run():
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        params = [p for p in layer.parameters() if p.requires_grad]
        return [out, *torch.autograd.grad(out, [xi, *params], dy)]

    got = run()
    assert sorts == [] and layer.token_dispatcher.sorts_in_place()
    dispatcher = layer.token_dispatcher
    with torch.no_grad():
        probs, routing_map = layer.router(x.view(-1, H))
        permuted = dispatcher.dispatch_preprocess(
            layer.linear_descend(x) if layer_type == "bigmac" else x, routing_map, probs)[0]
        assert dispatcher.dispatch_postprocess(permuted, None)[0] is permuted
        assert dispatcher.combine_preprocess(permuted) is permuted
    monkeypatch.setattr(AccountedAlltoAllDispatcher, "sorts_in_place", lambda self: False)
    want = run()
    assert len(sorts) == 2  # megatron's own path: the sort and its inverse, once each
    for a, b in zip(got, want):  # the same rows in the same order: only copies differ
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bigmac_and_fine_grained_experts_have_equal_size(one_rank):
    from plt_train.models.moe.flops import moe_layer_parameters

    fg, bm = _layer(one_rank, _model("fine_grained")), _layer(one_rank, _model("bigmac"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    r_h = H // 4
    assert n(fg.experts) == n(bm.experts) == 8 * 3 * H * r_h  # SwiGLU: 3 matrices of r*h x h
    assert n(bm) - n(fg) == 2 * r_h * H  # BigMac adds 2 r h^2 (descend + ascend)
    assert moe_layer_parameters(_model("bigmac"))["total"] == n(bm)
    assert moe_layer_parameters(_model("fine_grained"))["total"] == n(fg)
    assert moe_layer_parameters(_model("fine_grained"))["active"] == 8 * H + 2 * 3 * H * r_h


def test_shared_experts_are_added_to_the_routed_output(one_rank):
    model = _model("fine_grained", num_shared_experts=2)
    layer = _layer(one_rank, model)
    assert layer.shared_experts.linear_fc1.weight.shape == (2 * 2 * 16, H)  # gate|up, 2 x r*h
    x = torch.randn(S, B, H)
    with torch.no_grad():
        out, _ = layer(x)
        shared = layer.shared_experts(x)
        layer.use_shared_expert = False
        routed, _ = layer(x)
    torch.testing.assert_close(out, routed + shared)


def test_aux_loss_gradient_reaches_the_router(one_rank):
    """The load-balancing loss is part of the objective: with a zero upstream gradient the
    router still gets coeff * d(aux)/dW (times the tokens, which the per-token loss divides
    by again), computed here from the Switch formula by hand."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    coeff = 0.5
    layer = _layer(one_rank, _model("bigmac", aux_loss_coeff=coeff))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    x = torch.randn(S, B, H)
    out, _ = layer(x)
    out.backward(torch.zeros_like(out))
    got = layer.router.weight.grad.clone()

    w = layer.router.weight.detach().clone().requires_grad_(True)
    flat = x.reshape(-1, H)
    scores = torch.softmax(flat @ w.T, dim=-1)
    T, E, k = flat.shape[0], 8, 2
    counts = torch.zeros(E).scatter_add_(0, scores.topk(k, dim=-1).indices.flatten(),
                                         torch.ones(T * k))
    aux = coeff * E / (k * T * T) * (scores.sum(0) * counts).sum()
    (aux * T).backward()
    torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-7)
    assert got.abs().sum() > 0


# --- FLOPs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_type", ["fine_grained", "bigmac"])
def test_mlp_flops_count_the_active_experts(one_rank, layer_type):
    """FlopCounterMode on the layer (per-expert matmuls, dropless: exactly top_k per token)
    equals the formula; the model's MFU count uses it for its mlp component."""
    from torch.utils.flop_counter import FlopCounterMode

    from plt_train.models.gpt.flops import flops_per_sequence_from_config
    from plt_train.models.moe.flops import moe_mlp_flops_per_token

    model = _model(layer_type, expert_gemm="loop")
    layer = _layer(one_rank, model)
    x = torch.randn(S, B, H)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    per_token = moe_mlp_flops_per_token(model)
    assert counter.get_total_flops() == S * B * per_token
    r_h = H // 4
    expected = 2 * H * 8 + 2 * 3 * 2 * H * r_h + (4 * H * r_h if layer_type == "bigmac" else 0)
    assert per_token == expected
    count = flops_per_sequence_from_config(model, vocab_size=256)
    assert count.components["mlp"] == model.num_layers * S * per_token
    dense = flops_per_sequence_from_config(_model("dense"), vocab_size=256)
    assert count.components["qkv_proj"] == dense.components["qkv_proj"]
    assert count.training == 3 * count.forward


def test_table3_reproduces_the_papers_gpt3_xl_example():
    """GPT3-XL, 64 experts top-8, ep=32, bf16, 0.5M tokens: params 3.73B -> 3.78B, FLOPs +4.5%,
    all-to-all 1488 GiB -> 372 GiB per iteration (docs/design/architectures.md, BigMac)."""
    from plt_train.models.moe.flops import paper_table3

    kw = dict(b=256, s=2048, l=24, h=2048, v=50257, e=64, top_k=8, r=0.25, ep=32)
    fg, bm = paper_table3("fine_grained", **kw), paper_table3("bigmac", **kw)
    assert round(fg.params / 1e9, 2) == 3.73 and round(bm.params / 1e9, 2) == 3.78
    assert bm.flops / fg.flops == pytest.approx(1.045, abs=1e-3)
    assert fg.a2a_elements * 2 / 2**30 == pytest.approx(1488)
    assert bm.a2a_elements * 2 / 2**30 == pytest.approx(372)
    assert math.isclose(bm.a2a_elements, 0.25 * fg.a2a_elements)


# --- accounting ------------------------------------------------------------------------------

def test_single_rank_all_to_all_is_free_and_uncounted(one_rank):
    from megatron.core import parallel_state as ps

    from plt_train.models.moe.accounting import A2ACounter, counted_all_to_all

    counter = A2ACounter()
    x = torch.randn(5, 4, requires_grad=True)
    y = counted_all_to_all(ps.get_expert_model_parallel_group(), x, [5], [5], "dispatch",
                           counter=counter)
    y.sum().backward()
    snap = counter.snapshot()
    assert y is x or torch.equal(y, x)
    assert snap["a2a_bytes"] == 0 and snap["a2a_calls"] == 0
    with pytest.raises(ValueError):
        counted_all_to_all(ps.get_expert_model_parallel_group(), x, None, None, "other")


def test_logged_aux_loss_is_the_mean_per_layer_call(one_rank):
    """A looped model runs each MoE layer R times per micro-batch: the logged load-balancing
    loss (megatron's tracker / router calls) must not grow with R."""
    from plt_train.models.moe.metrics import MoEStepMetrics, moe_layers

    layer = _layer(one_rank, _model("bigmac", aux_loss_coeff=0.01, z_loss_coeff=0.001))
    metrics = MoEStepMetrics(moe_layers([layer]))
    assert metrics.layers == [layer]
    x = torch.randn(S, B, H)
    metrics.reset()
    layer(x)
    once = metrics.aux_loss_step_metrics()
    metrics.reset()
    for _ in range(3):
        layer(x)
    thrice = metrics.aux_loss_step_metrics()
    assert layer.router.calls == 3
    assert set(once) == {"load_balancing_loss", "z_loss"}
    for name in once:
        assert thrice[name] == pytest.approx(once[name], rel=1e-6)
    assert 0.9 < once["load_balancing_loss"] < 2.0
    assert all(v == 0 for v in metrics.aux_loss_step_metrics().values())  # read, then cleared


def test_each_model_counts_its_own_all_to_all_and_router_calls(one_rank):
    """No process-wide counters: two MoE layers built in one process count apart, and a
    step's metrics read only the model's own layers."""
    from plt_train.models.moe.metrics import MoEStepMetrics

    a = _layer(one_rank, _model("bigmac"))
    b = _layer(one_rank, _model("fine_grained"))
    assert a.a2a is not b.a2a and a.token_dispatcher.counter is a.a2a
    metrics = MoEStepMetrics([a])
    metrics.reset()
    a(torch.randn(S, B, H))
    b(torch.randn(S, B, H))
    b(torch.randn(S, B, H))
    assert (a.router.calls, b.router.calls) == (1, 2)
    metrics.reset()
    assert (a.router.calls, b.router.calls) == (0, 2)


# --- specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["dense", "fine_grained", "bigmac"])
def test_te_backend_keeps_the_moe_layer(one_rank, monkeypatch, layer):
    """On the TE backend the MoE spec replaces TE's fused dense MLP, behind a TENorm (the
    layout of megatron's TE spec for MoE); before, the TE layer spec dropped it and every
    layer was silently dense.  A dense model keeps TE's own fused MLP.  (No TE here: a
    stand-in for TE's layer spec, whose pre-MLP norm is fused away.)"""
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.transformer.identity_op import IdentityOp

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.models.gpt import specs
    from plt_train.models.moe import moe_spec

    fused = specs.with_mlp(specs.local_layer_spec(), specs.local_mlp_spec(), IdentityOp)
    monkeypatch.setattr(specs, "te_layer_spec", lambda: fused)
    model = _model(layer)
    tc = to_transformer_config(model, ParallelConfig(), torch.float32,
                               megatron_device_kwargs(one_rank))
    block = specs.decoder_block_spec(tc, "te", mlp=moe_spec(model))
    assert len(block.layer_specs) == model.num_layers and block.layer_norm is TENorm
    sub = block.layer_specs[0].submodules
    if layer == "dense":
        assert block.layer_specs[0] is fused
    else:
        assert sub.mlp.module.__name__ == {"fine_grained": "FineGrainedMoE",
                                           "bigmac": "BigMacMoE"}[layer]
        assert sub.pre_mlp_layernorm is TENorm
        assert sub.self_attention is fused.submodules.self_attention


# --- auxiliary-loss-free balancing ----------------------------------------------------------

@pytest.mark.parametrize("layer_type", ["fine_grained", "bigmac"])
def test_expert_bias_moves_the_routed_counts_toward_balance(one_rank, layer_type):
    """A router skewed toward expert 0: with ``model.moe.expert_bias`` megatron's update (the
    one ``finalize_model_grads`` runs after every step) lowers the over-loaded experts' bias
    until the load spreads; without it nothing moves.  The bias is a checkpointed buffer."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias, reset_model_temporary_tensors,
    )

    def imbalance(biased: bool) -> list[float]:
        model = _model(layer_type, router_score_function="sigmoid", expert_bias=biased,
                       bias_update_rate=0.02)
        layer = _layer(one_rank, model)
        w = layer.router.weight.detach()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, H, generator=g) * 0.1 + 2.0 * w[0] / w[0].norm()  # likes expert 0
        loads = []
        for _ in range(100):
            _, rmap = layer.router(x)  # grad enabled: counted, as in a training step
            counts = rmap.sum(0).float()
            loads.append((counts.max() / counts.mean()).item())
            if biased:
                _update_router_expert_bias([layer], layer.config)
                reset_model_temporary_tensors(layer.config, [layer])
        if biased:
            assert "router.expert_bias" in layer.state_dict()
        return loads

    off, on = imbalance(False), imbalance(True)
    assert off[0] == on[0] > 2.0  # the same skewed start: expert 0 takes most tokens
    assert off[-1] == off[0]  # no bias: the routing never changes
    # The sign update oscillates around the balance it drives toward: judge the last 20 steps.
    assert sum(on[-20:]) / 20 < 0.7 * on[0] and max(on[-20:]) < on[0], on[::10]
