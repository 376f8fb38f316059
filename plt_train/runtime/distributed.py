"""Process groups through megatron-core's ``parallel_state`` (TP, PP, CP, EP, DP).

Works the same under ``torchrun`` (env:// rendezvous) and in a plain single process (a
one-rank gloo/NCCL group on a free local port), so tests and notebooks need no launcher.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from plt_train.runtime import cpu_shim
from plt_train.runtime.device import DeviceInfo


@dataclass(frozen=True)
class ParallelDims:
    world: int
    rank: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: DeviceInfo, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
                     timeout_s: float = 600.0) -> ParallelDims:
    """Start the default process group and megatron-core's model-parallel groups.

    ``timeout_s`` bounds every collective of every group (``parallel.timeout_s``): a stalled
    or dead peer makes the others raise instead of hang (``runtime/hangs.py``)."""
    from megatron.core import parallel_state as ps

    cpu_shim.install()
    if "WORLD_SIZE" not in os.environ:  # plain `python`: a one-rank group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():  # kept across Hydra multirun jobs in one process (see below)
        kwargs = {"device_id": device.device} if device.is_cuda else {}
        dist.init_process_group(device.backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        atexit.register(_destroy_default_group)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        # Experts are never sharded over TP (plt_train.models.moe): megatron-core's default
        # (expert TP = TP) would build expert groups our MoE layers do not use.
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_s / 60,  # a timedelta(minutes=...): floats work
    )
    return ParallelDims(
        world=dist.get_world_size(), rank=dist.get_rank(), tp=tp, pp=pp, cp=cp, ep=ep,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def set_seed(seed: int) -> None:
    """Same default seed on every rank (data order and init do not depend on it: see
    ``models/init.py``); megatron's tracker gets per-TP-rank streams for dropout."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_logging_rank() -> bool:
    """The last rank holds the loss (last pipeline stage), as in Megatron-LM."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def destroy_distributed() -> None:
    """Tear down megatron-core's groups after a run.

    The default process group stays until the process exits: a Hydra multirun (``-m``) runs
    several jobs in one process, and under torchrun a second ``init_process_group`` on the same
    rendezvous store fails (gloo cannot reconnect), while megatron's groups can be rebuilt with
    new sizes on the existing default group.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
