"""Device and backend choice: CUDA + NCCL when a GPU is visible, else CPU + gloo.

Everything that differs between the two (backend, default precision, megatron-core fusion
switches) is decided here, from the detected device, so no other module branches on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    backend: str  # "nccl" | "gloo"
    name: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def detect_device(local_rank: int | None = None) -> DeviceInfo:
    """The local rank's GPU, modulo the GPUs this process sees (as Megatron-LM does): under
    ``srun --gpus-per-task=1`` or ``--gpu-bind`` each task sees only its own GPU as cuda:0
    while its LOCAL_RANK (SLURM_LOCALID) still counts the node's tasks."""
    if torch.cuda.is_available():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return DeviceInfo(torch.device("cuda", index), "nccl", torch.cuda.get_device_name(index))
    return DeviceInfo(torch.device("cpu"), "gloo", "cpu")


def have_transformer_engine() -> bool:
    """TE's bare PyPI package is an empty meta package that raises RuntimeError on import
    (docs/design/megatron-on-cpu.md), so both errors mean "not installed"."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def resolve_dtype(precision: str, device: DeviceInfo) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and not our oracle)."""
    if precision == "auto":
        return torch.bfloat16 if device.is_cuda else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[str(precision)]


def megatron_device_kwargs(device: DeviceInfo) -> dict:
    """TransformerConfig switches that depend on the device (docs/design/megatron-on-cpu.md).

    The fused paths need CUDA kernels (apex / TE / custom extensions); on CPU they are off.
    """
    cuda = device.is_cuda
    return dict(
        use_cpu_initialization=not cuda,
        # Final weights come from plt_train.models.init (layout-independent).  megatron's own
        # init is skipped on GPU; on CPU it must run, because the CPU path of
        # ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding (megatron-core
        # 0.16.1) sets the `tensor_model_parallel` attributes only inside that init, and
        # without them the grad norm drops every TP-sharded weight on TP ranks > 0.
        perform_initialization=not cuda,
        gradient_accumulation_fusion=False,  # needs apex's fused_weight_gradient_mlp_cuda
        # megatron's fused SwiGLU (no bias here) is torch.compile'd: on with CUDA, as in
        # Megatron-LM; on CPU torch.compile would build C++ per shape.  model.swiglu_fusion.
        bias_activation_fusion=cuda,
        masked_softmax_fusion=False,  # unused: attention is SDPA (local) or TE
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
