"""The one place where megatron-core 0.16.1 is taught to run on CPU (gloo).

megatron-core assumes CUDA in a handful of places (found by experiment, listed in
``docs/design/megatron-on-cpu.md``).  Each workaround below names the megatron-core function it
works around.  ``install()`` is a no-op when CUDA is available, so GPU runs use megatron-core
exactly as shipped.

Technique: most places call ``torch.cuda.current_device()`` or pass ``device="cuda"`` through
module-level ``torch``.  For those modules we rebind their ``torch`` global to a thin proxy that
redirects CUDA allocations to the CPU and makes ``torch.cuda.synchronize`` a no-op; every other
attribute is the real ``torch``.  Functions with CUDA type-string checks are replaced outright.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

_INSTALLED = False


def _to_cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    return kwargs


class _NullStream:
    """Stand-in for a CUDA stream: the MoE alltoall dispatcher's device-to-host copy stream
    (``_maybe_dtoh_and_synchronize`` records an event on it and synchronises that event)."""

    def wait_stream(self, *_args):
        return None

    def record_event(self, *_args):
        return types.SimpleNamespace(synchronize=lambda: None, wait=lambda *_: None)

    def synchronize(self):
        return None


class _CpuCuda:
    """Stand-in for ``torch.cuda`` inside patched megatron modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def Stream(*_args, **_kwargs):  # noqa: N802 - mirrors torch.cuda.Stream
        return _NullStream()

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return types.SimpleNamespace(wait_stream=lambda *_: None, synchronize=lambda: None)

    @staticmethod
    def is_available():
        return False


class _CpuTorch:
    """Stand-in for the ``torch`` module inside patched megatron modules."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        return torch.zeros(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def ones(*args, **kwargs):
        return torch.ones(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def full(*args, **kwargs):
        return torch.full(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def tensor(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return torch.tensor(*args, **_to_cpu_device(kwargs))


# Modules whose CUDA assumptions are all of the "allocate on cuda" / "synchronize" kind.
_PROXIED_MODULES = (
    # GlobalMemoryBuffer.get_tensor: torch.cuda.current_device() (sequence parallel, attention)
    "megatron.core.utils",
    # _communicate / _communicate_shapes: recv buffers on torch.cuda.current_device(), syncs
    "megatron.core.pipeline_parallel.p2p_communication",
    # forward_backward_*: torch.zeros([], dtype=torch.int, device="cuda") for token counts
    "megatron.core.pipeline_parallel.schedules",
    # get_grad_norm_fp32 / count_zeros_fp32: device="cuda" scratch tensors
    "megatron.core.optimizer.clip_grads",
    # MegatronOptimizer: found_inf / _scale_one / dummy overflow buffers on "cuda"
    "megatron.core.optimizer.optimizer",
    # MoEAlltoAllTokenDispatcher: torch.cuda.Stream() for the d2h copy of split sizes, an
    # event recorded on it and synchronised (_maybe_dtoh_and_synchronize)
    "megatron.core.transformer.moe.token_dispatcher",
    # Router.gating: moves a CPU router weight to torch.cuda.current_device() on every
    # forward; TopKRouter: expert-bias / global-aux-loss buffers on the current device
    "megatron.core.transformer.moe.router",
    # _ParamAndGradBuffer.__init__: param/grad buffers on torch.cuda.current_device()
    "megatron.core.distributed.param_and_grad_buffer",
    # DistributedDataParallel.__init__: torch.cuda.Stream for overlapped communication
    "megatron.core.distributed.distributed_data_parallel",
    # RotaryEmbedding.get_emb: inv_freq moved to torch.cuda.current_device() on every forward
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # GPTModel._preprocess (inference rotary cache) and Attention (inference KV buffers)
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    # broadcast_data, linear_with_grad_accumulation_and_async_allreduce (sequence-parallel
    # all-gather buffers) and the _gather/_reduce_scatter mappings allocate on the current device
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    # FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize() before every save
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # AsyncCallsQueue / DistributedAsyncCaller: completion flags all-reduced on the current device
    "megatron.core.dist_checkpointing.strategies.async_utils",
    # save_state_dict_async_finalize: failure flags all-reduced on the current device
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # FullyParallelSave/LoadStrategyWrapper and exchange_by_distribution: exchange buffers
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    # DistributedOptimizer: state-dict shards allocated on torch.cuda.current_device()
    "megatron.core.optimizer.distrib_optimizer",
)

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_report_cuda_types():
    """``DistributedOptimizer.__init__`` sorts parameters by ``param.type()`` strings and
    rejects anything but ``'torch.cuda.*Tensor'``; during that call CPU tensors answer with the
    CUDA name of their dtype (the only thing the strings encode there)."""
    original = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return _CUDA_TYPE_NAMES.get(self.dtype, original(self))
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = original


class _CpuRNGStatesTracker:
    """CPU replacement for ``tensor_parallel.random.CudaRNGStatesTracker``.

    ``model_parallel_cuda_manual_seed`` and every ``get_cuda_rng_tracker().fork()`` (dropout in
    tensor-parallel regions, weight init) read ``torch.cuda`` generator states.  This tracker
    keeps named CPU generator states with the same interface.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of ``optimizer.clip_grads.clip_grad_by_total_norm_fp32``.

    The shipped one asserts ``param.grad.type() == 'torch.cuda.FloatTensor'`` and uses a CUDA
    scratch buffer for apex's multi-tensor scale.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(clip_coeff)


def _model_parallel_cuda_manual_seed(seed, *args, tp_rank=None, ep_rank=None, etp_rank=None,
                                     **kwargs):
    """CPU version of ``tensor_parallel.random.model_parallel_cuda_manual_seed``: same seeds,
    CPU generators (the shipped one calls ``torch.cuda.manual_seed``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    ep_rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
    etp_rank = ps.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def install() -> None:
    """Apply every CPU workaround once. No-op when CUDA is available."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    proxy = _CpuTorch()
    for name in _PROXIED_MODULES:
        importlib.import_module(name).torch = proxy

    from megatron.core import tensor_parallel
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mrandom

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build_distributed_optimizer = DistributedOptimizer.__init__

    def _init_on_cpu(self, *args, **kwargs):
        with _cpu_tensors_report_cuda_types():
            build_distributed_optimizer(self, *args, **kwargs)

    DistributedOptimizer.__init__ = _init_on_cpu

    # Activation recompute (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``) saves
    # and restores the CPU generator, the tracker's states and the CUDA generator through
    # these two; without CUDA there is no CUDA generator to save.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.model_parallel_cuda_manual_seed = _model_parallel_cuda_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = _model_parallel_cuda_manual_seed
    _INSTALLED = True
