"""Throughput and model-FLOPs utilisation (MFU).

MFU = achieved model FLOP/s per device / peak FLOP/s per device.  The numerator comes from
``plt_train.models.gpt.flops`` (matmul FLOPs, causal attention, no recomputation); the
denominator from ``peak_flops_per_second``: a user override, a datasheet dense peak for known
GPUs, or a timed matmul where no datasheet applies (CPU, unknown GPU), so that MFU is always
defined and always relative to something the device can actually do.
"""
from __future__ import annotations

import functools
import math
import re
import time
from collections import deque
from typing import Deque, Dict, Optional, Tuple

import torch

# Datasheet DENSE (no 2:4 sparsity) tensor-core peaks per GPU, in FLOP/s: (bf16/fp16, tf32).
# Ordered most specific first; matched against torch.cuda.get_device_name().
_GPU_PEAKS: Tuple[Tuple[str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756e12, 378e12),
    (r"\bH100\b.*\bNVL\b", 835e12, 418e12),
    (r"\bH100\b", 989e12, 495e12),  # SXM
    (r"\bGH200\b", 989e12, 495e12),
    (r"\bH200\b", 989e12, 495e12),
    (r"\bA100\b", 312e12, 156e12),
    (r"\bL40S\b", 362e12, 183e12),
    (r"\bA10\b", 125e12, 62.5e12),
    (r"\bL4\b", 121e12, 60e12),
)


def _datasheet_peak(name: str, dtype: torch.dtype) -> Optional[Tuple[float, str]]:
    for pattern, half_peak, tf32_peak in _GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype in (torch.bfloat16, torch.float16):
                return half_peak, f"datasheet {name} dense {dtype}"
            if dtype == torch.float32:
                # Plain fp32 (non-tensor-core) peaks are ~10x lower; training in fp32 on these
                # GPUs should run matmuls as TF32, so TF32 is the ceiling MFU is measured against.
                return tf32_peak, f"datasheet {name} dense TF32 (used for fp32)"
    return None


@functools.lru_cache(maxsize=None)
def _measured_peak(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """Best FLOP/s of square matmuls (1024, then 2048 if affordable), a few reps each.

    ``threads`` is part of the cache key: on CPU the result depends on torch's thread count.
    """
    del threads
    best = 0.0
    for n in (1024, 2048):
        # Filled without drawing from the RNG: this runs after a checkpoint restored it, and
        # a draw here would change every dropout mask of the resumed run.
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)
        b = torch.full((n, n), 0.25, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up: allocator, kernel selection, thread pool start
        rep_seconds = math.inf
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rep_seconds = min(rep_seconds, time.perf_counter() - t0)
        best = max(best, 2 * n**3 / max(rep_seconds, 1e-9))
        if rep_seconds > 0.25:  # slow device/dtype: 2048 would take seconds and say no more
            break
    return best


def peak_flops_per_second(
    device: torch.device, dtype: torch.dtype, override_tflops: Optional[float] = None
) -> Tuple[float, str]:
    """Peak dense FLOP/s of one device for ``dtype`` matmuls, and where the number came from.

    Order: ``override_tflops`` (config ``logging.peak_tflops``), the datasheet table for known
    CUDA GPUs, else a measurement (cached per device, dtype and CPU thread count).
    """
    if override_tflops is not None:
        return float(override_tflops) * 1e12, "override"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = _datasheet_peak(name, dtype)
        if found is not None:
            return found
    return _measured_peak(device, dtype, torch.get_num_threads()), "measured"


class ThroughputMeter:
    """Running tokens/s, TFLOP/s per device, MFU and ETA from per-step timings.

    Feed the GLOBAL tokens and model FLOPs of each optimizer step (all ranks together) and its
    wall time.  The first step fed is warm-up (compilation, allocator, data-loader start) and
    never enters the averages; until a second step arrives ``metrics()`` is empty.  Averages
    cover the last ``window`` steps so a slowdown shows up instead of being diluted.
    """

    def __init__(
        self, total_steps: int, peak_flops_per_device: float, num_devices: int = 1, window: int = 50
    ) -> None:
        self.total_steps = total_steps
        self.peak = peak_flops_per_device
        self.num_devices = num_devices
        self._seen_warmup = False
        self._last_step = 0
        self._steps: Deque[Tuple[int, float, float]] = deque(maxlen=window)

    def update(self, step: int, tokens: int, flops: float, seconds: float) -> Dict[str, float]:
        """Record one step; return ``metrics()`` after it."""
        self._last_step = step
        if not self._seen_warmup:
            self._seen_warmup = True
        else:
            self._steps.append((tokens, flops, seconds))
        return self.metrics()

    def metrics(self) -> Dict[str, float]:
        """``tokens_per_s``, ``tflops_per_device``, ``mfu`` (a fraction) and ``eta_s``."""
        seconds = sum(s for _, _, s in self._steps)
        if not self._steps or seconds <= 0:
            return {}
        tokens = sum(t for t, _, _ in self._steps)
        flops_per_device = sum(f for _, f, _ in self._steps) / self.num_devices / seconds
        remaining = max(self.total_steps - self._last_step, 0)
        return {
            "tokens_per_s": tokens / seconds,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_per_device / self.peak,
            "eta_s": remaining * seconds / len(self._steps),
        }
