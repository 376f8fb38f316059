"""Fused Triton kernels for plt_train's hot paths, each beside the pure-torch reference it must
reproduce:

- ``gswa``: PLT's gated sliding-window attention for loops r >= 2 (causal over loop 1's K/V +
  window-w over the loop's own K/V + per-head gate), forward and backward, in one pass over the
  queries.  Reference: ``plt_train.models.plt.ops``.
- ``plt_decode``: one decode step's attention for all R loop-rows of a PLT layer in one launch,
  reading loop 1's full cache and the later loops' rolling windows.
- ``dcca``: BigMac's descend projection fused with the permutation into expert order, and the
  gate-weighted un-permute fused with the combine before the ascend projection (alone, the
  fine-grained layer's un-permute).
- ``offline``: not a kernel: compiles the launches for sm_90 on a machine without a GPU and
  reads registers, spills and shared memory from ``ptxas`` (``scripts/kernel_resources.py``).

Selection (``model.loop.kernel``, ``model.moe.dcca_kernel``): ``auto`` uses Triton on CUDA
when it imports and the pure-torch path otherwise; ``triton`` insists (on CPU it runs only
under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how CI tests the kernels);
``torch`` never uses Triton.  A call whose shapes a kernel does not cover (e.g. left-padded
batches in prefill) takes the reference path; that is a fallback, not an error.

Under ``auto`` each kernel also passes a first-use check on the device (``verified``: a small
forward+backward against its reference) before it replaces the reference; a kernel that fails
to compile on the installed Triton, or disagrees, is reported once and left out, so a new
Triton version or GPU never breaks a run that did not ask for the kernel.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from plt_train.config.schema import KernelChoice


_TRITON_IMPORT: dict = {}  # {"error": str | None} once tried


def _triton_import_error() -> str | None:
    """Why triton does not import, or None; tried once per process.  A plain dict, not
    ``functools.lru_cache``: torch.compile traces through the cache wrapper of a function it
    meets in a compiled layer, and warns each time it does."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_IMPORT["error"] = None
        except Exception as exc:  # ImportError, or a broken install raising at import
            _TRITON_IMPORT["error"] = f"triton does not import ({type(exc).__name__}: {exc})"
    return _TRITON_IMPORT["error"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unusable_reason(device) -> str | None:
    """Why Triton kernels cannot run on ``device`` ("cuda", "cpu" or a torch.device), or None."""
    why = _triton_import_error()
    if why:
        return why
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda" or interpreting():
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on {kind}, for tests)"


def use_triton(choice: str, device) -> bool:
    """The run-time switch every kernel call site uses (see the module docstring)."""
    choice = KernelChoice(choice)  # ValueError on an unknown one
    if choice == KernelChoice.torch:
        return False
    why = triton_unusable_reason(device)
    if choice == KernelChoice.triton:
        if why:
            raise RuntimeError(f"kernel=triton but {why}")
        return True
    return why is None and getattr(device, "type", str(device)).startswith("cuda")


# Set by offline.compiling_for_hopper while CPU tensors stand in for CUDA ones.
_COMPILE_TARGET: str | None = None


def gpu_tiles(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` takes the GPU tile sizes: on CUDA, or compiled for a GPU from
    CPU tensors (plt_train/kernels/offline.py); else the interpreter's small tiles."""
    return t.is_cuda or _COMPILE_TARGET is not None


_VERIFIED: dict = {}


def verified(name: str, device, check) -> bool:
    """``check(device) -> max relative error ok?`` once per (kernel, device, process)."""
    key = (name, str(device))
    if key not in _VERIFIED:
        if torch.compiler.is_compiling():  # the check runs a backward: not inside a graph
            raise RuntimeError(f"the {name} kernel's first-use check must run before "
                               f"torch.compile traces it (models.compile.compile_layers runs "
                               f"it)")
        try:
            ok, why = bool(check(device)), "it disagreed with its reference"
        except Exception as exc:  # compile errors of a Triton version we never ran
            ok, why = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        if not ok:
            warnings.warn(f"the {name} Triton kernel failed its first-use check on {device} "
                          f"({why}); using the pure-torch path")
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def self_check_precision(device) -> tuple:
    """(dtype, tolerance) of a first-use check on ``device``: bf16 on GPU (what training and
    decoding run), fp32 on CPU (the interpreter has no bf16)."""
    cuda = getattr(device, "type", str(device)).startswith("cuda")
    return (torch.bfloat16, 3e-2) if cuda else (torch.float32, 1e-4)


def max_rel_err(got, want) -> float:
    """Largest ``max |got - want| / max |want|`` over tensors (or equal-length sequences of
    them), compared in fp32; inf when ``got`` holds a NaN or inf, so NaN never passes."""
    if torch.is_tensor(got):
        got, want = [got], [want]
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().float(), b.detach().float()
        if not bool(torch.isfinite(a).all()):
            return math.inf
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)))
    return worst
