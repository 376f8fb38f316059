"""The all-to-all wire formats (plt_train/models/moe/wire.py) on one process: what a row costs,
how far a round trip moves it, and that nothing non-finite arrives finite.  The formats inside
the real expert-parallel all-to-all: tests/distributed/test_moe_layer_parity.py."""
from __future__ import annotations

import pytest
import torch

from plt_train.models.moe import wire

# The casts run on the GPU in training (scripts/device/gpu_check.sh runs this file).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the same casts on the GPU"))]


def rows(n, width, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes: one scale per row (or tile) must follow each.
    scale = torch.logspace(-4, 3, n).unsqueeze(1)
    return (torch.randn(n, width, generator=g) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [256, 64, 200])
def test_fp8_round_trip_error_is_e4m3_rounding(width, device):
    x = rows(33, width, device=device)
    payload = wire.encode(x, "fp8")
    assert payload.dtype == torch.uint8
    # d bytes of float8 plus one int8 exponent per 128-channel tile (per row if d % 128).
    tiles = width // 128 if width % 128 == 0 else 1
    assert payload.shape == (33, width + tiles) == (33, wire.row_bytes(width, "fp8", 4))
    back = wire.decode(payload, "fp8", torch.float32, (width,))
    assert back.dtype == torch.float32 and back.shape == x.shape
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; values below the
    # tile's normal range round to multiples of 2^-9 * scale, scale < 2 * amax / 448.
    tile = wire.tile_width(width)
    amax = x.view(33, -1, tile).abs().amax(-1, keepdim=True).expand(-1, -1, tile).reshape(33, -1)
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + amax * 2.0 ** -10 * 2 / 448 + 1e-30).all()
    rel = (err.norm() / x.norm()).item()
    assert 1e-3 < rel < 0.05  # really rounded, and only by e4m3's rounding


def test_fp8_scales_are_powers_of_two_that_use_the_range():
    x = rows(8, 256)
    payload = wire.encode(x, "fp8")
    exponent = payload[:, 256:].contiguous().view(torch.int8).float()
    q = payload[:, :256].contiguous().view(wire.FP8).float().view(8, 2, 128)
    peak = q.abs().amax(-1)
    # Each tile's largest value lands in the top binade of e4m3: (224, 448].
    assert ((peak > 224) & (peak <= 448)).all(), peak
    want = torch.ceil(torch.log2(x.view(8, 2, 128).abs().amax(-1) / 448))
    assert torch.equal(exponent, want)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_keeps_zeros_and_non_finite_values_arrive_as_nan(device):
    x = torch.zeros(3, 128, device=device)
    x[1, 5], x[2, 0], x[2, 1] = float("nan"), float("inf"), 3.0
    back = wire.decode(wire.encode(x, "fp8"), "fp8", torch.float32, (128,))
    assert torch.equal(back[0], x[0])
    assert back[1, 5].isnan() and back[1].isnan().sum() == 1
    # The inf does not saturate to a finite 448 * scale; its finite neighbours keep their scale.
    assert back[2, 0].isnan() and back[2, 1] == 3.0


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_a_rank_with_no_rows_sends_an_empty_payload(fmt):
    x = torch.empty(0, 256)
    payload = wire.encode(x, fmt)
    assert payload.shape[0] == 0
    assert wire.decode(payload, fmt, torch.float32, (256,)).shape == (0, 256)


def test_bf16_and_native_formats():
    x = rows(5, 96)
    assert wire.encode(x, "native") is x
    payload = wire.encode(x, "bf16")
    assert payload.dtype == torch.bfloat16 and wire.row_bytes(96, "bf16", 4) == 192
    back = wire.decode(payload, "bf16", torch.float32, (96,))
    assert back.dtype == torch.float32
    assert torch.equal(back, x.to(torch.bfloat16).float())
    assert not torch.equal(back, x)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_from_bf16_activations(device):
    x = rows(7, 128, dtype=torch.bfloat16, device=device)
    back = wire.decode(wire.encode(x, "fp8"), "fp8", torch.bfloat16, (128,))
    assert back.dtype == torch.bfloat16
    assert ((back.float() - x.float()).norm() / x.float().norm()).item() < 0.05


def test_which_all_to_all_gets_which_format():
    # DeepSeek-V3: fp8 only for the dispatch forward; the combine and both backwards in bf16.
    assert wire.phase_formats("fp8", "dispatch") == ("fp8", "bf16")
    assert wire.phase_formats("fp8", "combine") == ("bf16", "bf16")
    assert wire.phase_formats("bf16", "combine") == ("bf16", "bf16")
    assert wire.phase_formats("native", "dispatch") == ("native", "native")
    with pytest.raises(ValueError, match="not a valid WireFormat"):
        wire.phase_formats("fp4", "dispatch")
