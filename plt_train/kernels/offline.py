"""Compile the kernels for a Hopper GPU on a machine without one, exactly as the JIT would, and
read their resource use from the assembler.

The CPU tests run the kernels in Triton's interpreter, which says nothing about registers or
shared memory.  Inside ``compiling_for_hopper()`` a kernel launch does not run: it goes
through the JIT's own argument specialisation (unit strides become constants, 16-byte
alignment and divisibility become attributes, as for a CUDA launch with the same strides and
sizes), is compiled for sm_90 and assembled with ``ptxas -v``, and a ``Build`` record is
appended.  CPU tensors stand in for CUDA ones (only their dtype, strides and data pointers'
alignment matter) and the kernels pick their GPU tiles (``kernels.gpu_tiles``).  So a
launch at the issue's shapes is compiled as a GPU run would compile it, and a tile choice
that spills registers or does not fit in shared memory shows up before any GPU session.

Needs a Triton whose CUDA backend and ``ptxas`` are installed (the CPU wheel has both) and
``TRITON_INTERPRET`` unset when the kernels are imported (the interpreter replaces the JIT).
Used by ``scripts/kernel_resources.py`` and ``tests/kernels/test_compile_for_hopper.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

from plt_train import kernels

# H100 / H200 (sm_90): per SM 64K 32-bit registers, 2048 threads, 228 KB shared memory of
# which one block may use 227 KB; registers go to warps in units of 256 (8 per thread).
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024


@dataclasses.dataclass
class Build:
    """One kernel specialisation as compiled for sm_90."""

    kernel: str
    constants: dict  # the constexpr arguments (tiles, flags) and the JIT's constant-1 ints
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared_memory: int  # bytes per block
    ptx: str = dataclasses.field(repr=False, default="")

    @property
    def fits(self) -> bool:
        return self.shared_memory <= SMEM_PER_BLOCK

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers, threads and shared memory."""
        threads = 32 * self.num_warps
        per_warp = -(-self.registers // 8) * 8 * 32
        by_regs = REGISTERS_PER_SM // (per_warp * self.num_warps)
        by_smem = SMEM_PER_SM // (self.shared_memory + SMEM_RESERVED_PER_BLOCK)
        return max(0, min(by_regs, THREADS_PER_SM // threads, by_smem, 32))

    def row(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("ptx")
        return {**out, "fits": self.fits, "blocks_per_sm": self.blocks_per_sm}


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(arch).path


def _assemble(ptx: str, arch: int) -> tuple:
    """(registers, spill stores, spill loads) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_ptxas_path(arch), f"-arch=sm_{arch}a", "-v", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@contextlib.contextmanager
def compiling_for_hopper(arch: int = 90):
    """Within the block kernel launches compile for sm_``arch`` instead of running; yields the
    list their ``Build`` records are appended to."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if kernels.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the JIT")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    builds: list = []

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        # JITFunction.run's specialisation, with the CUDA backend instead of the active driver
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound,
                                                             specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        names = list(fn.arg_names)
        builds.append(Build(fn.__name__, {names[k[0]]: v for k, v in constants.items()},
                            options.num_warps, options.num_stages, *_assemble(ptx, arch),
                            compiled.metadata.shared, ptx))

    run = JITFunction.run
    JITFunction.run = compile_launch
    kernels._COMPILE_TARGET = f"sm_{arch}"
    try:
        yield builds
    finally:
        JITFunction.run = run
        kernels._COMPILE_TARGET = None


__all__ = ["Build", "compiling_for_hopper"]
