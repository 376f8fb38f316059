"""``plt_train/kernels/plt_decode.py`` against its pure-torch reference
(``ops.plt_decode_attention``).

Without a GPU the kernel runs through Triton's interpreter (tests/conftest.py), so shapes
are tiny but ragged: cache lengths and windows that are not multiples of the key block, GQA
groups that do not fill the 16-row tile, a head dim that is not a power of two, left-padded
sequences, a window not yet full, the full cache split over several programs.  Fresh random
inputs per case; NaN never passes (assert_close does not treat NaN as equal).
"""
from __future__ import annotations

import pytest
import torch

from plt_train.models.plt import ops

plt_decode = pytest.importorskip("plt_train.kernels.plt_decode", reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(seed, *, batch, loops, kv_heads, group, dim, cache, window, cursor, pads=None,
                gswa=True, dtype=torch.float32):
    """Decode-step inputs with position ``cursor`` being decoded; positions after it hold
    random garbage (unwritten cache) and are invalid."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    nq = kv_heads * group
    q = randn(1, loops * batch, nq, dim)
    k_full, v_full = randn(batch, kv_heads, cache, dim), randn(batch, kv_heads, cache, dim)
    valid = torch.zeros(batch, cache, dtype=torch.bool, device=DEVICE)
    valid[:, :cursor + 1] = True
    for b, pad in enumerate(pads or []):
        valid[b, :pad] = False
    inputs = dict(q=q, k_full=k_full, v_full=v_full, key_valid=valid, scale=dim ** -0.5)
    if gswa and loops > 1:
        positions = torch.arange(max(0, cursor - window + 1), cursor + 1, device=DEVICE)
        win_valid = torch.zeros(batch, window, dtype=torch.bool, device=DEVICE)
        win_valid[:, positions % window] = valid[:, positions]
        gate = torch.rand(1, (loops - 1) * batch, nq, 1, generator=g).to(DEVICE, dtype)
        inputs.update(k_win=randn(loops - 1, batch, kv_heads, window, dim),
                      v_win=randn(loops - 1, batch, kv_heads, window, dim),
                      win_valid=win_valid, gate=gate)
    return inputs, torch.tensor([cursor], device=DEVICE)


def reference(inputs):
    """The reference in fp32 (for bf16 inputs: of the same bf16-rounded values)."""
    up = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
          for k, v in inputs.items()}
    return ops.plt_decode_attention(**up)


CASES = {
    # name: (shape kwargs, kernel kwargs)
    "R2-b1-ragged-cache": (dict(batch=1, loops=2, kv_heads=2, group=2, dim=16, cache=40,
                                window=8, cursor=37), dict(block_n=16)),
    "R3-b3-padded-gqa3-d24": (dict(batch=3, loops=3, kv_heads=2, group=3, dim=24, cache=50,
                                   window=6, cursor=20, pads=[0, 5, 11]), dict(block_n=16)),
    "R2-b3-window-not-full": (dict(batch=3, loops=2, kv_heads=1, group=4, dim=16, cache=24,
                                   window=8, cursor=3, pads=[2, 0, 1]), dict(block_n=16)),
    "R3-b2-split3": (dict(batch=2, loops=3, kv_heads=2, group=2, dim=32, cache=64, window=5,
                          cursor=45, pads=[0, 7]), dict(block_n=16, splits=3)),
    "R2-no-gswa": (dict(batch=2, loops=2, kv_heads=2, group=2, dim=16, cache=30, window=4,
                        cursor=29, gswa=False), dict(block_n=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_fp32(name):
    shape, launch = CASES[name]
    inputs, cursor = make_inputs(list(CASES).index(name), **shape)
    out = plt_decode.plt_decode_attention(**inputs, cursor=cursor, **launch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["R3-b3-padded-gqa3-d24", "R3-b2-split3"])
def test_kernel_matches_reference_bf16(name):
    shape, launch = CASES[name]
    inputs, cursor = make_inputs(7, dtype=torch.bfloat16, **shape)
    out = plt_decode.plt_decode_attention(**inputs, cursor=cursor, **launch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference(inputs), rtol=2e-2, atol=2e-2)


def test_keys_after_the_cursor_are_never_read_and_nan_fails():
    shape, launch = CASES["R2-b1-ragged-cache"]
    inputs, cursor = make_inputs(3, **shape)
    expected = reference(inputs)
    poisoned = dict(inputs)
    for key in ("k_full", "v_full"):  # the unwritten tail of the cache
        poisoned[key] = inputs[key].clone()
        poisoned[key][:, :, shape["cursor"] + 1:] = float("nan")
    out = plt_decode.plt_decode_attention(**poisoned, cursor=cursor, **launch)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Without the cursor the kernel scans the whole cache: NaN reaches the output, and the
    # comparison must fail rather than pass.
    nan_out = plt_decode.plt_decode_attention(**poisoned, **launch)
    assert nan_out.isnan().any()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(nan_out, expected)


def test_kernel_choice():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = torch.zeros(1, 4, 4, 16, device=device), torch.zeros(2, 2, 8, 16, device=device)
    assert not plt_decode.kernel_applies("torch", q, k)
    assert plt_decode.kernel_applies("auto", q, k) == torch.cuda.is_available()
    assert not plt_decode.kernel_applies("auto", q.cpu(), k.cpu())
    if not torch.cuda.is_available():  # the interpreter counts as usable for "triton"
        assert plt_decode.kernel_applies("triton", q, k)
    assert not plt_decode.kernel_applies("triton", torch.zeros(1, 4, 4, 512, device=device),
                                         torch.zeros(2, 2, 8, 512, device=device))  # head dim


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (timing-size "
                    "shapes; the split merge's atomics only race on real hardware)")
def test_kernel_matches_reference_on_gpu_at_decode_sizes():
    for batch, splits in [(1, None), (1, 16), (32, None)]:
        inputs, cursor = make_inputs(batch, batch=batch, loops=3, kv_heads=4, group=4,
                                     dim=128, cache=2100, window=64, cursor=2047,
                                     dtype=torch.bfloat16)
        for _ in range(3):  # the counters must come back to zero between launches
            out = plt_decode.plt_decode_attention(**inputs, cursor=cursor, splits=splits)
            torch.testing.assert_close(out.float(), reference(inputs), rtol=2e-2, atol=2e-2)


def test_first_use_self_check_passes():
    """What ``model.loop.kernel=auto`` runs before trusting the kernel on a device."""
    assert plt_decode._self_check(torch.device(DEVICE))
