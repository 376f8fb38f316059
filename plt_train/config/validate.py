"""Validation that runs before any process group starts.

Every error names the field, what is wrong and how to fix it, so a bad launch fails in a
second with one readable line instead of a hang or a traceback from inside megatron-core.
"""
from __future__ import annotations

import torch

from plt_train.config.schema import RunConfig


class ConfigError(ValueError):
    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"config error: {field}: {problem}. Fix: {fix}")
        self.field = field


def derived_data_parallel(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor * p.pipeline * p.context)


def validate(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError for the first problem found."""
    from plt_train.models import MODEL_REGISTRY
    from plt_train.models.common.backends import have_transformer_engine

    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    for name in ("tensor", "pipeline", "context", "expert"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}",
                              f"set parallel.{name}=1 or more")
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(
            "parallel", f"world size {world_size} is not divisible by tensor({p.tensor}) x "
            f"pipeline({p.pipeline}) x context({p.context}) = {model_parallel}",
            f"launch a multiple of {model_parallel} processes or lower the parallel sizes")
    dp = world_size // model_parallel
    if p.data is not None and p.data != dp:
        raise ConfigError("parallel.data", f"set to {p.data} but world size {world_size} / "
                          f"{model_parallel} gives {dp}", "drop parallel.data or fix the sizes")
    if world_size % (p.tensor * p.expert * p.pipeline):
        raise ConfigError("parallel.expert", f"world size {world_size} is not divisible by "
                          f"tensor x expert x pipeline = {p.tensor * p.expert * p.pipeline}",
                          "choose an expert-parallel size that divides the data-parallel ranks")
    if m.name not in MODEL_REGISTRY:
        raise ConfigError("model.name", f"unknown model {m.name!r}",
                          f"use one of {sorted(MODEL_REGISTRY)}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"num_attention_heads={m.num_attention_heads}",
                          "pick a hidden size that is a multiple of the head count")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", f"{groups} does not divide "
                          f"num_attention_heads={m.num_attention_heads}", "use a divisor")
    if m.num_attention_heads % p.tensor or groups % p.tensor:
        raise ConfigError("parallel.tensor", f"{p.tensor} does not divide the attention heads "
                          f"({m.num_attention_heads}) and query groups ({groups})",
                          "use a tensor-parallel size that divides both")
    if m.make_vocab_size_divisible_by % p.tensor:
        raise ConfigError("model.make_vocab_size_divisible_by",
                          f"{m.make_vocab_size_divisible_by} is not a multiple of "
                          f"parallel.tensor={p.tensor}", "use a multiple of the TP size")
    if m.num_layers % p.pipeline:
        raise ConfigError("parallel.pipeline", f"{p.pipeline} stages do not divide "
                          f"model.num_layers={m.num_layers}", "use a divisor of num_layers")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor parallelism",
                          "set parallel.tensor>1 or parallel.sequence_parallel=false")
    if p.sequence_parallel and m.seq_length % p.tensor:
        raise ConfigError("model.seq_length", f"{m.seq_length} is not divisible by "
                          f"parallel.tensor={p.tensor} (sequence parallel)", "adjust seq_length")
    if m.backend not in ("auto", "local", "te"):
        raise ConfigError("model.backend", f"unknown backend {m.backend!r}", "auto, local or te")
    if m.backend == "te" and not have_transformer_engine():
        raise ConfigError("model.backend", "te requested but Transformer Engine is not "
                          "installed", "install the [gpu] extra or use model.backend=local")
    if p.context > 1 and not (m.backend == "te" or (m.backend == "auto" and torch.cuda.is_available()
                                                   and have_transformer_engine())):
        raise ConfigError("parallel.context", "context parallelism needs the TE backend",
                          "set parallel.context=1 or use model.backend=te on a GPU")
    if t.micro_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not a multiple "
                          f"of micro_batch_size({t.micro_batch_size}) x data parallel({dp})",
                          f"use a multiple of {t.micro_batch_size * dp}")
    if t.steps < 1:
        raise ConfigError("train.steps", f"must be >= 1, got {t.steps}", "set train.steps")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("train.precision", f"unknown {t.precision!r}", "auto, fp32 or bf16")
    if t.eval_interval > 0 and t.eval_iters < 1:
        raise ConfigError("train.eval_iters", "must be >= 1 when eval_interval > 0",
                          "set train.eval_iters or train.eval_interval=0")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", f"{o.min_lr} must be in [0, lr={o.lr}]", "lower it")
    if o.decay_style not in ("cosine", "linear", "constant", "inverse-square-root"):
        raise ConfigError("optim.decay_style", f"unknown {o.decay_style!r}",
                          "cosine, linear, constant or inverse-square-root")
    if o.warmup_steps > (o.decay_steps or t.steps):
        raise ConfigError("optim.warmup_steps", f"{o.warmup_steps} exceeds the decay steps",
                          "lower warmup_steps")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise ConfigError("logging.wandb_mode", f"unknown {cfg.logging.wandb_mode!r}",
                          "offline, online or disabled")
    if cfg.checkpoint.save_interval < 0:
        raise ConfigError("checkpoint.save_interval", "must be >= 0", "0 disables periodic saves")
