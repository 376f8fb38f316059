"""The CPU shim is a no-op with CUDA, and rebinds megatron-core's CUDA assumptions without it."""
from __future__ import annotations

import importlib

import torch

from plt_train.runtime import cpu_shim


def test_shim_is_a_noop_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(cpu_shim, "_INSTALLED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    utils = importlib.import_module("megatron.core.utils")
    before = utils.torch
    cpu_shim.install()
    assert utils.torch is before and cpu_shim._INSTALLED is False


def test_shim_redirects_cuda_allocations_on_cpu():
    if torch.cuda.is_available():
        import pytest
        pytest.skip("CPU-only behaviour")
    cpu_shim.install()
    from megatron.core import utils
    buf = utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.device.type == "cpu" and buf.shape == (2, 3)
    from megatron.core.pipeline_parallel import schedules
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    tracker = __import__("megatron.core.tensor_parallel.random", fromlist=["x"])
    t = tracker.get_cuda_rng_tracker()
    t.reset()
    t.add("a", 123)
    with t.fork("a"):
        x = torch.rand(3)
    t2 = type(t)()
    t2.add("a", 123)
    with t2.fork("a"):
        y = torch.rand(3)
    assert torch.equal(x, y)  # a named, seeded CPU stream


def test_device_defaults_follow_the_hardware():
    from plt_train.runtime.device import DeviceInfo, megatron_device_kwargs, resolve_dtype
    cpu = DeviceInfo(torch.device("cpu"), "gloo", "cpu")
    gpu = DeviceInfo(torch.device("cuda", 0), "nccl", "H100")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", gpu) == torch.bfloat16
    assert megatron_device_kwargs(cpu)["use_cpu_initialization"] is True
    assert megatron_device_kwargs(gpu)["use_cpu_initialization"] is False


def test_gpu_is_the_local_rank_modulo_the_visible_ones(monkeypatch):
    """torchrun: 8 visible GPUs, LOCAL_RANK picks one.  srun --gpus-per-task=1: each task sees
    only its own GPU (cuda:0) while LOCAL_RANK = SLURM_LOCALID still counts the node's tasks."""
    from plt_train.runtime import device as dev

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"gpu{i}")
    for visible, local_rank, want in ((8, 5, 5), (1, 3, 0), (4, 6, 2)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=visible: v)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        info = dev.detect_device()
        assert (info.device, info.name, chosen[-1]) == (torch.device("cuda", want), f"gpu{want}",
                                                        want)
