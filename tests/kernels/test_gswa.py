"""The fused G-SWA kernel (plt_train/kernels/gswa.py) against its pure-torch reference (ops.gswa).

On CPU the kernel runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes are small; ragged ones (sequence not a multiple of the 16-row tile, head dim 24
padded to 32, window longer than the sequence, one token) cover every masked edge.  The
interpreter does not support bfloat16 (it keeps it as uint16 bit patterns, so a copy kernel
returns garbage here; triton-lang/triton#11584, "we just don't support it yet"), so on CPU the
half-precision case runs in float16; on a GPU the bf16 case runs too, and
scripts/bench_kernels.py checks bf16 at full size.
"""
from __future__ import annotations

import functools

import pytest
import torch

from plt_train.kernels import gswa
from plt_train.models.plt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Triton's CPU interpreter misreads bfloat16"))]
SHAPES = [  # S, B, query heads, KV heads, head dim, window
    (37, 2, 4, 2, 16, 5),
    (16, 1, 2, 2, 16, 3),
    (50, 1, 2, 1, 24, 20),
    (33, 2, 2, 2, 16, 64),
    (1, 1, 2, 2, 16, 4),
]
# Loop 1's causal branch in the one Triton kernel, or from SDPA with the rest in Triton, the
# window branch's backward then in one kernel (the default) or two.
PATHS = ["sdpa/fused", "sdpa/split", "triton"]
BRANCHES = pytest.mark.parametrize("branch", PATHS)


def _kernel(path):
    branch, _, backward = path.partition("/")
    return functools.partial(gswa.gswa_attention, global_branch=branch,
                             window_backward=backward or None)


def _inputs(S, B, HQ, HK, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(True)

    q, k1, v1, k, v = rand(S, B, HQ, D), *(rand(S, B, HK, D) for _ in range(4))
    gate = torch.rand(S, B, HQ, 1, generator=g).to(DEVICE, dtype).requires_grad_(True)
    return [q, k1, v1, k, v, gate], torch.randn(S, B, HQ, D, generator=g).to(DEVICE, dtype)


def _run(fn, inputs, dy, scale, window):
    y = fn(*inputs, scale, window)
    wanted = [t for t in inputs if t.requires_grad]
    return y, torch.autograd.grad(y, wanted, dy)


@BRANCHES
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "S{}B{}H{}/{}D{}w{}".format(*s))
def test_fp32_forward_and_gradients_match_the_reference(shape, branch):
    S, B, HQ, HK, D, w = shape
    inputs, dy = _inputs(S, B, HQ, HK, D, torch.float32, seed=S)
    scale = D ** -0.5
    y, grads = _run(_kernel(branch), inputs, dy, scale, w)
    y_ref, grads_ref = _run(ops.gswa, inputs, dy, scale, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["q", "k_shared", "v_shared", "k", "v", "gate"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"d{name}")


@BRANCHES
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_matches_the_fp32_reference(dtype, branch):
    S, B, HQ, HK, D, w = 45, 2, 4, 2, 32, 7
    inputs, dy = _inputs(S, B, HQ, HK, D, dtype, seed=3)
    scale = D ** -0.5
    y, grads = _run(_kernel(branch), inputs, dy, scale, w)
    ref_in = [t.detach().float().requires_grad_(True) for t in inputs]
    y_ref, grads_ref = _run(ops.gswa, ref_in, dy.float(), scale, w)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=1e-2)
    for a, b in zip(grads, grads_ref):
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < 1e-2, float(err)  # NaN fails this too


@BRANCHES
def test_detached_shared_kv_and_strided_views(branch):
    """Loop 1's K/V detached (the released recipe): no gradient for them, the rest unchanged;
    q/k/v as strided views of one fused projection, as megatron's QKV split gives them."""
    S, B, HQ, HK, D, w = 29, 2, 4, 2, 16, 6
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(S, B, HK, (HQ // HK + 2) * D, generator=g).to(DEVICE).requires_grad_()
    q = fused[..., :HQ // HK * D].reshape(S, B, HQ, D)
    k, v = fused[..., -2 * D:-D], fused[..., -D:]
    assert not q.is_contiguous() or not k.is_contiguous()
    k1, v1 = torch.randn(2, S, B, HK, D, generator=g).to(DEVICE).unbind(0)
    gate = torch.rand(S, B, HQ, 1, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(S, B, HQ, D, generator=g).to(DEVICE)
    y = _kernel(branch)(q, k1, v1, k, v, gate, D ** -0.5, w)
    got = torch.autograd.grad(y, (fused, gate), dy)
    y_ref = ops.gswa(q, k1, v1, k, v, gate, D ** -0.5, w)
    want = torch.autograd.grad(y_ref, (fused, gate), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_sdpa_branch_records_a_graph_only_for_a_backward(mode, monkeypatch):
    """The SDPA branch records its own autograd graph inside the forward (for the backward's
    in-place dQ sum), but only when a backward can follow: not in prefill or decode (no_grad,
    inference_mode), where it would only hold memory; the output is the same either way."""
    S, B, HQ, HK, D, w = 21, 1, 2, 2, 16, 5
    inputs, _ = _inputs(S, B, HQ, HK, D, torch.float32, seed=4)
    recorded = []
    sdpa = ops.causal_attention
    monkeypatch.setattr(ops, "causal_attention",
                        lambda *a: recorded.append(torch.is_grad_enabled()) or sdpa(*a))
    with getattr(torch, "enable_grad" if mode == "grad" else mode)():
        y = gswa.gswa_attention(*inputs, D ** -0.5, w)
    assert recorded == [mode == "grad"] and y.requires_grad == (mode == "grad")
    monkeypatch.undo()
    want = ops.gswa(*inputs, D ** -0.5, w)
    torch.testing.assert_close(y.detach(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward", ["fused", "split"])
def test_sdpa_gets_its_gradient_in_its_outputs_layout(backward, monkeypatch):
    """SDPA's output may come in another memory layout than the [s, b, h, d] input (a GPU
    backend's [b, h, s, d], say), and its backward copies a gradient of another layout first:
    the per-row kernel writes ``g dy`` straight into the output's layout, and the gradients
    still equal the reference's."""
    S, B, HQ, HK, D, w = 19, 2, 4, 2, 16, 5
    inputs, dy = _inputs(S, B, HQ, HK, D, torch.float32, seed=5)
    sdpa, seen = ops.causal_attention, []

    def heads_first(*a):  # SDPA's result, stored [b, h, s, d]
        out = sdpa(*a).permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
        out.register_hook(lambda grad: seen.append(grad.stride()))
        seen.append(out.stride())
        return out

    monkeypatch.setattr(ops, "causal_attention", heads_first)
    got = _run(_kernel(f"sdpa/{backward}"), inputs, dy, D ** -0.5, w)
    assert seen[0] != torch.empty(S, B, HQ, D).stride() and seen == [seen[0]] * 2
    monkeypatch.undo()
    want = _run(ops.gswa, inputs, dy, D ** -0.5, w)
    for a, b in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@BRANCHES
def test_the_window_and_the_gate_matter(branch):
    """Guards the oracle: a wrong window or an ignored gate would be caught above."""
    S, B, HQ, HK, D, w = 24, 1, 2, 2, 16, 4
    inputs, _ = _inputs(S, B, HQ, HK, D, torch.float32, seed=1)
    y = _kernel(branch)(*inputs, D ** -0.5, w).detach()
    assert (y - ops.gswa(*inputs, D ** -0.5, w + 1)).abs().max() > 1e-2
    flipped = inputs[:5] + [1 - inputs[5]]
    assert (y - ops.gswa(*flipped, D ** -0.5, w)).abs().max() > 1e-2


def test_selection():
    from plt_train.kernels import use_triton

    q = torch.zeros(4, 1, 2, 16, device=DEVICE)
    assert use_triton("auto", q.device) == (DEVICE == "cuda")  # the interpreter: tests only
    assert not gswa.fused_applies("torch", q, None)
    assert gswa.fused_applies("triton", q, None)  # CUDA, or TRITON_INTERPRET=1 here
    assert not gswa.fused_applies("triton", q, torch.ones(1, 4, dtype=torch.bool))  # padding
    with pytest.raises(ValueError):
        use_triton("fast", q.device)
    with pytest.raises(ValueError, match="global_branch"):
        gswa.gswa_attention(q, q, q, q, q, q[..., :1], 0.25, 4, global_branch="flash")
    with pytest.raises(ValueError, match="window_backward"):
        gswa.gswa_attention(q, q, q, q, q, q[..., :1], 0.25, 4, window_backward="one")


def test_first_use_check_guards_auto():
    """``auto`` keeps a kernel only after it matched its reference on the device once; a
    kernel that raises (say, a compile error on another Triton) is reported and left out."""
    from plt_train import kernels

    assert gswa._self_check(torch.device(DEVICE))  # the real check passes
    kernels._VERIFIED.pop(("broken", "cpu"), None)
    with pytest.warns(UserWarning, match="broken Triton kernel failed"):
        assert not kernels.verified("broken", "cpu", lambda d: 1 / 0)
    assert not kernels.verified("broken", "cpu", lambda d: True)  # remembered


def test_plt_model_with_the_kernel_equals_the_reference_path(one_rank, monkeypatch):
    """A PLT-3 model (no detach, random gates) trains the same through the fused kernel:
    logits and every parameter gradient."""
    from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
    from plt_train.models import build_model
    from plt_train.runtime.device import megatron_device_kwargs

    def build(kernel):
        m = ModelConfig(name="plt", num_layers=2, hidden_size=64, num_attention_heads=4,
                        num_query_groups=2, seq_length=20, loops=3, init_method_std=0.1,
                        loop=LoopConfig(window=4, detach_kv=False, kernel=kernel))
        chunks, _, _ = build_model(m, ParallelConfig(), 50, torch.float32,
                                   megatron_device_kwargs(one_rank), 7, one_rank.device)
        model = chunks[0]
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for name, p in model.named_parameters():
                if "gswa_gate" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return model

    calls = []
    fused = gswa.gswa_attention
    monkeypatch.setattr(gswa, "gswa_attention", lambda *a: calls.append(1) or fused(*a))
    tok = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(2))
    tok, pos = tok.to(one_rank.device), torch.arange(20, device=one_rank.device)[None]
    out = {}
    for kernel in ("torch", "triton"):
        model = build(kernel)
        logits = model(tok, pos, None)
        logits.float().pow(2).mean().backward()
        out[kernel] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert len(calls) == 2 * 2  # layers x later loops, only with kernel=triton
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    assert out["torch"][1].keys() == out["triton"][1].keys()
    for name, grad in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
