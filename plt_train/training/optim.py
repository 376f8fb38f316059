"""Optimizer and learning-rate schedule, both megatron-core's own."""
from __future__ import annotations

import torch

from plt_train.config.schema import OptimConfig, ParallelConfig


def build_optimizer(chunks, optim: OptimConfig, parallel: ParallelConfig, dtype: torch.dtype):
    """AdamW; with bf16 weights megatron keeps fp32 master weights in the optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, optim: OptimConfig, train_steps: int):
    """Linear warmup from 0, then ``decay_style`` down to ``min_lr`` (in optimizer steps).

    A WSD schedule always takes the config's values on resume (megatron does not even save
    ``wsd_decay_steps``): the point of WSD is that the run's end is chosen late."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from plt_train.config.schema import DecayStyle

    override = optim.override_schedule_on_resume or optim.decay_style == DecayStyle.wsd

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.decay_steps or train_steps,
        lr_decay_style=str(optim.decay_style),  # megatron's spelling (DecayStyle's value)
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_steps,
        wd_incr_style="constant",
        wsd_decay_steps=optim.wsd_decay_steps,
        lr_wsd_decay_style=str(optim.wsd_decay_style),
        override_opt_param_scheduler=override,
        use_checkpoint_opt_param_scheduler=not override,
    )
