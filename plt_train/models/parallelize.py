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
        bucket_size=parallel.bucket_size,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk)
        for chunk in chunks
    ]
