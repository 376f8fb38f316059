"""Data-parallel wrapping of a rank's model chunks: megatron-core's DDP (torchtitan calls this
step ``parallelize``; tensor, pipeline and expert parallelism are already in the layers)."""
from __future__ import annotations

from plt_train.config.schema import ParallelConfig


def wrap_data_parallel(chunks, tconfig, parallel: ParallelConfig) -> list:
    """megatron-core DDP: contiguous fp32 grad buffers (``main_grad``), bucketed all-reduce."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.bucket_size,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk)
        for chunk in chunks
    ]


def gather_params(chunks) -> None:
    """Finish the distributed optimizer's parameter all-gather now.  With
    ``parallel.overlap_param_gather`` it is deferred to the next forward pass (each module's
    pre-hook gathers its bucket), so between an optimizer step and that forward every rank
    holds only its own shard up to date: anything reading the weights outside a forward (a
    checkpoint, the finite-weights check, the sample) calls this first, as Megatron-LM does
    before its saves.  A no-op otherwise.  Collective."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)
