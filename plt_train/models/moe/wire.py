"""The number format of the expert-parallel all-to-all (``model.moe.wire_format``).

* ``native``: the activations' own dtype (bf16 in GPU training, fp32 in the CPU tests).
* ``bf16``: all four all-to-alls (dispatch and combine, forward and backward) carry bfloat16,
  cast back to the activations' dtype on arrival.  Nothing changes in bf16 training; fp32 runs
  put half the bytes on the wire.
* ``fp8``: DeepSeek-V3's recipe (arXiv 2412.19437, section 3.3.2, "Low-Precision
  Communication"): the dispatch forward, the largest transfer and the one feeding the expert
  GEMMs, goes as float8 e4m3 with one power-of-two scale per 1 x 128 tile of a row. The scale
  travels in the same row as its int8 exponent, so one all-to-all carries both. The combine and
  both backward all-to-alls stay bf16, as in DeepSeek-V3. A row of width d costs
  ``d + d / 128`` bytes instead of ``2 d``. If d is not a multiple of 128, the whole row shares
  one scale.

Where the papers are silent, we chose:

* **Rounding covers every routed row.** When EP > 1 this includes the rows a rank sends to its
  own experts, which never leave the device. Rounding is row-wise, so EP=2 and EP=4 compute the
  same numbers. At EP = 1 there is no wire and nothing is rounded.
* **Straight-through gradients.** The casts pass the gradient on unchanged, as ``Tensor.to``
  does. The backward all-to-all then applies its own format to the gradient.
* **Non-finite values arrive as NaN.** This is so that a blow-up still shows in the loss.
  float8 e4m3 has no infinity, and torch's cast saturates, so an inf would otherwise arrive as
  448 x scale. The scale of a tile comes from its finite values.
"""
from __future__ import annotations

import math

import torch

from plt_train.config.schema import WireFormat

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn
TILE = 128  # channels per fp8 scale, DeepSeek-V3's 1 x 128 activation tiles


def phase_formats(wire_format: str, name: str) -> tuple:
    """(forward, backward) format of the all-to-all ``name`` (``dispatch`` / ``combine``)."""
    wire_format = WireFormat(wire_format)  # ValueError on an unknown one
    if wire_format == WireFormat.fp8:
        return (WireFormat.fp8 if name == "dispatch" else WireFormat.bf16), WireFormat.bf16
    return wire_format, wire_format


def tile_width(width: int) -> int:
    return TILE if width % TILE == 0 else width


def encode(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows of ``x`` ([N, ...]) as they go on the wire: a 2-D tensor, one row per token."""
    if fmt == "native":
        return x
    if fmt == "bf16":
        return x.to(torch.bfloat16)
    if fmt != "fp8":
        raise ValueError(f"unknown wire format {fmt!r}: {list(WireFormat)}")
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:])).float()  # no -1: N may be 0
    n, width = rows.shape
    tile = tile_width(width)
    tiles = rows.view(n, width // tile, tile)
    finite = torch.isfinite(tiles)
    amax = torch.where(finite, tiles.abs(), 0.0).amax(-1, keepdim=True)
    # The smallest power of two that brings the tile into e4m3's range; exponents stay within
    # int8 and fp32's normal range (an all-zero tile gets 2^-126 and encodes as zeros).
    exponent = torch.ceil(torch.log2(amax.clamp(min=2.0 ** -126) / FP8_MAX)).clamp(-126, 127)
    scaled = torch.where(finite, tiles * torch.exp2(-exponent), float("nan"))
    q = scaled.to(FP8).view(torch.uint8).view(n, width)
    scales = exponent.view(n, width // tile).to(torch.int8).view(torch.uint8)
    return torch.cat([q, scales], dim=1)


def decode(payload: torch.Tensor, fmt: str, dtype: torch.dtype, row_shape) -> torch.Tensor:
    """Inverse of ``encode``: rows of ``row_shape`` in ``dtype``."""
    if fmt == "native":
        return payload
    n = payload.shape[0]
    if fmt == "bf16":
        return payload.to(dtype).view(n, *row_shape)
    width = math.prod(row_shape)
    tile = tile_width(width)
    q = payload[:, :width].contiguous().view(FP8).float().view(n, width // tile, tile)
    exponent = payload[:, width:].contiguous().view(torch.int8).float().unsqueeze(-1)
    return (q * torch.exp2(exponent)).to(dtype).view(n, *row_shape)


def row_bytes(width: int, fmt: str, native_bytes: int) -> int:
    """Bytes one row of ``width`` values costs on the wire in ``fmt``."""
    if fmt == "native":
        return width * native_bytes
    if fmt == "bf16":
        return width * 2
    return width + width // tile_width(width)


__all__ = ["decode", "encode", "phase_formats", "row_bytes", "tile_width"]
