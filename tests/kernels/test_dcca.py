"""The fused (un)permutation kernels (plt_train/kernels/dcca.py: BigMac's DCCA dispatch /
combine, and the fine-grained layer's gate-weighted combine) against their pure-torch
references and megatron's permutation, and both MoE layers with the kernels against the layers
without.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes are small; ragged ones (tokens not a multiple of the 32-token tile, widths not
multiples of 16, top-3 padded to 4 slots, dropped assignments, a token with every assignment
dropped, one token) cover the masked edges.  assert_close fails on NaN.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.kernels import dcca

# On a GPU the kernels run compiled on CUDA tensors (CPU tensors would take the reference).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # tokens, hidden, latent, experts, top_k, drop some assignments
    (37, 40, 24, 6, 2, True),
    (16, 32, 16, 4, 1, False),
    (50, 20, 36, 8, 3, True),
    (70, 64, 48, 8, 2, False),
    (1, 16, 8, 4, 2, False),
]
IDS = ["T{}h{}rh{}E{}k{}{}".format(*s[:5], "drop" if s[5] else "") for s in SHAPES]


def _routing(T, E, K, drop, g):
    """megatron-style routing: top-k of random logits; with ``drop``, about one assignment in
    five removed (a capacity factor's effect) and token 0 losing all of its."""
    logits = torch.randn(T, E, generator=g, device=DEVICE)
    top = logits.topk(K, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=DEVICE).scatter_(1, top, True)
    if drop:
        routing_map &= torch.rand(T, E, generator=g, device=DEVICE) > 0.2
        routing_map[0] = False
    probs = (torch.softmax(logits, -1) * routing_map).requires_grad_(True)
    return routing_map, probs


def _case(T, h, rh, E, K, drop, dtype=torch.float32, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    routing_map, probs = _routing(T, E, K, drop, g)
    n_out = int(routing_map.sum())

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=DEVICE) * scale
        return t.to(dtype).requires_grad_(True)

    return dict(routing_map=routing_map, probs=probs, n_out=n_out, x=rand(T, h),
                w_down=rand(rh, h, scale=h ** -0.5), y=rand(n_out, rh),
                w_up=rand(h, rh, scale=rh ** -0.5), d_perm=rand(n_out, rh).detach(),
                d_out=rand(T, h).detach(), d_comb=rand(T, rh).detach())


def _descend(fn, c, K):
    dest, _ = dcca.expert_slots(c["routing_map"], c["probs"], K)
    extra = {"rows_covered": True} if fn is dcca.descend_permute else {}
    out = fn(c["x"], c["w_down"], dest, c["n_out"], **extra)
    return out, torch.autograd.grad(out, [c["x"], c["w_down"]], c["d_perm"])


def _combine(fn, c, K):
    dest, slot_probs = dcca.expert_slots(c["routing_map"], c["probs"], K)
    extra = {"rows_covered": True} if fn is dcca.combine_ascend else {}
    out = fn(c["y"], slot_probs, dest, c["w_up"], **extra)
    return out, torch.autograd.grad(out, [c["y"], c["probs"], c["w_up"]], c["d_out"])


def _combine_only(fn, c, K):
    """The fine-grained layer's un-permutation: no projection (here at width r*h)."""
    dest, slot_probs = dcca.expert_slots(c["routing_map"], c["probs"], K)
    extra = {"rows_covered": True} if fn is dcca.combine else {}
    out = fn(c["y"], slot_probs, dest, **extra)
    return out, torch.autograd.grad(out, [c["y"], c["probs"]], c["d_comb"])


OPS = [(_descend, dcca.descend_permute, dcca.descend_permute_reference, ["x", "w_down"]),
       (_combine, dcca.combine_ascend, dcca.combine_ascend_reference, ["y", "probs", "w_up"]),
       (_combine_only, dcca.combine, dcca.combine_reference, ["y", "probs"])]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_expert_slots_invert_megatrons_permutation(shape):
    """dest[t, k] is the row of megatron's permute output holding token t's k-th expert, and
    slot_probs the probability megatron permutes with it; every row is named exactly once."""
    from megatron.core.transformer.moe.moe_utils import permute

    T, h, _, E, K, drop = shape
    c = _case(*shape)
    _, permuted_probs, sorted_indices = permute(
        c["x"].detach(), c["routing_map"], probs=c["probs"].detach(), num_out_tokens=c["n_out"])
    dest, slot_probs = dcca.expert_slots(c["routing_map"], c["probs"], K)
    assert dest.shape == (T, K) and dest.dtype == torch.int32
    valid = dest >= 0
    assert int(valid.sum()) == c["n_out"] == sorted_indices.numel()
    rows = dest[valid].long()
    assert torch.equal(rows.sort().values, torch.arange(c["n_out"], device=DEVICE))
    tokens = torch.arange(T, device=DEVICE).unsqueeze(1).expand(T, K)
    assert torch.equal(sorted_indices[rows], tokens[valid])
    assert torch.equal(slot_probs[valid], permuted_probs[rows])
    assert torch.equal(slot_probs[~valid], torch.zeros(int((~valid).sum()), device=DEVICE))
    if drop:
        assert (~valid).any()


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fp32_forward_and_gradients_match_the_reference(shape):
    K = shape[4]
    c = _case(*shape, seed=sum(shape[:5]))
    tol = dict(rtol=1e-5, atol=1e-5)
    for run, fn, ref_fn, names in OPS:
        out, grads = run(fn, c, K)
        ref, ref_grads = run(ref_fn, c, K)
        torch.testing.assert_close(out, ref, **tol, msg=fn.__name__)
        for name, a, b in zip(names, grads, ref_grads):
            torch.testing.assert_close(a, b, **tol, msg=f"{fn.__name__} d{name}")


def test_descend_permute_equals_megatrons_projection_then_permute():
    from megatron.core.transformer.moe.moe_utils import permute

    c = _case(37, 40, 24, 6, 2, True)
    latent = (c["x"] @ c["w_down"].t()).detach()
    want, _, _ = permute(latent, c["routing_map"], num_out_tokens=c["n_out"])
    dest, _ = dcca.expert_slots(c["routing_map"], c["probs"], 2)
    got = dcca.descend_permute(c["x"].detach(), c["w_down"].detach(), dest, c["n_out"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_the_fp32_reference(dtype):
    """Half inputs: the kernels (fp32 accumulation, one rounding per output) against the fp32
    reference on the same rounded inputs, within a few units of the half format's last place
    relative to each tensor's largest entry; and against the half-precision reference."""
    K = 2
    c = _case(45, 48, 40, 8, K, True, dtype=dtype, seed=11)
    c32 = {k: v.detach().float().requires_grad_(v.requires_grad)
           if torch.is_tensor(v) and v.is_floating_point() else v for k, v in c.items()}
    eps = torch.finfo(dtype).eps

    def close(a, b, ulps, msg):
        torch.testing.assert_close(a.float(), b.float(), rtol=ulps * eps,
                                   atol=ulps * eps * b.float().abs().max().item(), msg=msg)

    for run, fn, ref_fn, _ in OPS:
        out, grads = run(fn, c, K)
        ref32, grads32 = run(ref_fn, c32, K)
        ref, grads_ref = run(ref_fn, c, K)
        assert out.dtype == dtype and all(a.dtype == b.dtype for a, b in zip(grads, grads_ref))
        close(out, ref32, 4, f"{fn.__name__} vs fp32")
        close(out, ref, 4, f"{fn.__name__} vs half reference")
        for i, (a, b32, b) in enumerate(zip(grads, grads32, grads_ref)):
            close(a, b32, 4, f"{fn.__name__} grad {i} vs fp32")
            close(a, b, 8, f"{fn.__name__} grad {i} vs half reference")


def test_rows_no_slot_names_are_zero():
    """Without ``rows_covered`` the ops take any injective dest (here random, with padding
    rows no slot names): those rows are zero in the output and in dy."""
    g = torch.Generator(DEVICE).manual_seed(5)
    T, K, h, rh, n_out = 19, 3, 24, 40, 70
    dest = torch.randperm(n_out, generator=g, device=DEVICE)[:T * K].view(T, K).int()
    dest[2, 1] = dest[7, 0] = -1
    free = torch.ones(n_out, dtype=torch.bool, device=DEVICE)
    free[dest[dest >= 0].long()] = False
    x = torch.randn(T, h, generator=g, device=DEVICE)
    w_down = torch.randn(rh, h, generator=g, device=DEVICE)
    w_up = torch.randn(h, rh, generator=g, device=DEVICE)
    y = torch.randn(n_out, rh, generator=g, device=DEVICE).requires_grad_(True)
    slot_probs = torch.rand(T, K, generator=g, device=DEVICE).requires_grad_(True)
    out = dcca.descend_permute(x, w_down, dest, n_out)
    torch.testing.assert_close(out, dcca.descend_permute_reference(x, w_down, dest, n_out),
                               rtol=1e-5, atol=1e-5)
    assert free.sum() > 0
    assert torch.equal(out[free], torch.zeros(int(free.sum()), rh, device=DEVICE))
    d_out = torch.randn(T, h, generator=g, device=DEVICE)
    dy, dp = torch.autograd.grad(dcca.combine_ascend(y, slot_probs, dest, w_up), [y, slot_probs],
                                 d_out)
    dy_ref, dp_ref = torch.autograd.grad(
        dcca.combine_ascend_reference(y, slot_probs, dest, w_up), [y, slot_probs], d_out)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dp, dp_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(dy[free], torch.zeros(int(free.sum()), rh, device=DEVICE))
    assert dp[2, 1] == 0 and dp[7, 0] == 0


def test_nan_reaches_the_output_rows_of_its_token():
    """A NaN in a token's input is not masked away: its rows (and only those) are NaN."""
    c = _case(37, 40, 24, 6, 2, False)
    dest, _ = dcca.expert_slots(c["routing_map"], c["probs"], 2)
    x = c["x"].detach().clone()
    x[5, 3] = float("nan")
    out = dcca.descend_permute(x, c["w_down"].detach(), dest, c["n_out"], rows_covered=True)
    bad = out.isnan().any(1)
    assert torch.equal(bad.nonzero().flatten().sort().values, dest[5].long().sort().values)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, dcca.descend_permute_reference(
            c["x"].detach(), c["w_down"].detach(), dest, c["n_out"]))


# --- the layer --------------------------------------------------------------------------------

def _moe_layer(dev, kernel: str, capacity, kind: str = "bigmac"):
    from megatron.core.transformer.spec_utils import build_module

    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
    from plt_train.models.init import init_weights
    from plt_train.models.moe import mlp_spec
    from plt_train.runtime.device import megatron_device_kwargs

    model = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, seq_length=13,
                        moe=MoEConfig(layer=kind, num_experts=8, top_k=2, ratio=0.5,
                                      capacity_factor=capacity, aux_loss_coeff=0.01,
                                      dcca_kernel=kernel))
    tc = to_transformer_config(model, ParallelConfig(), torch.float32,
                               megatron_device_kwargs(dev))
    layer = build_module(mlp_spec(model), config=tc)
    layer.set_layer_number(1)
    init_weights([layer], seed=3, std=0.1, num_layers=2)
    return layer


@pytest.mark.parametrize("kind", ["bigmac", "fine_grained"])
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["dropless", "capacity1.0"])
def test_layer_with_kernels_equals_the_unfused_layer(one_rank, capacity, kind, monkeypatch):
    """Same weights, tokens and upstream gradient: outputs, input and every parameter
    gradient (router through the gate probabilities, projections, experts) agree.  With the
    kernels megatron's ``unpermute`` is never called (counted here), without them once."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from plt_train.models.moe import layer as layer_module

    unpermute = layer_module.unpermute
    calls = []

    def counted_unpermute(*args, **kwargs):
        calls.append(1)
        return unpermute(*args, **kwargs)

    monkeypatch.setattr(layer_module, "unpermute", counted_unpermute)

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=one_rank.device))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(13, 3, 48, generator=g).to(one_rank.device)
    d_out = torch.randn(13, 3, 48, generator=g).to(one_rank.device)
    results = {}
    for kernel in ("triton", "torch"):
        layer = _moe_layer(one_rank, kernel, capacity, kind)
        xi = x.clone().requires_grad_(True)
        calls.clear()
        out, _ = layer(xi)
        out.backward(d_out)
        assert layer.fused_kernels == (kernel == "triton")
        assert len(calls) == (kernel == "torch")
        results[kernel] = (out.detach(), xi.grad,
                           {n: p.grad for n, p in layer.named_parameters()})
        if capacity is not None:
            with torch.no_grad():
                _, routing_map = layer.router(x.view(-1, 48))
            assert routing_map.sum() < 2 * x.shape[0] * x.shape[1]  # assignments dropped
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = results["triton"], results["torch"]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    projections = {"linear_descend.weight", "linear_ascend.weight"} if kind == "bigmac" else set()
    assert set(grads) == set(grads_ref) and projections | {"router.weight"} <= set(grads)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_fuses_on_cuda_only(one_rank):
    """``auto`` selects Triton only on CUDA; on CPU (even under the interpreter) the layer
    takes megatron's permute / unpermute."""
    for kind in ("bigmac", "fine_grained"):
        layer = _moe_layer(one_rank, "auto", None, kind)
        layer(torch.randn(13, 3, 48, device=one_rank.device))
        assert layer.fused_kernels == (one_rank.device.type == "cuda")


def test_first_use_check_passes():
    """What ``auto`` runs once per device before trusting the fused ops."""
    from plt_train.kernels import dcca

    assert dcca.self_check(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
