"""The config checks of the looped decoders (``model.name`` vanilla, looped, plt)."""
from __future__ import annotations

from plt_train.config import ConfigError, RunConfig
from plt_train.config.schema import Backend, ModelName
from plt_train.models.common.backends import check_kernel_choice


def validate_looped(cfg: RunConfig, data_parallel: int) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.name == ModelName.vanilla and m.loops != 1:
        raise ConfigError("model.loops", "vanilla runs its block once",
                          "set model.name=looped or model.name=plt, or model.loops=1")
    if m.loop.window < 1:
        raise ConfigError("model.loop.window", f"must be >= 1, got {m.loop.window}",
                          "use the paper's 64")
    check_kernel_choice("model.loop.kernel", m.loop.kernel)
    if p.pipeline > 1 and m.loops > 1:
        # One virtual pipeline chunk per loop: megatron's interleaved schedule needs the
        # micro-batches of a step in groups of the pipeline size.
        mb = t.global_batch_size // (t.micro_batch_size * data_parallel)
        if mb % p.pipeline:
            raise ConfigError("train.global_batch_size", f"{mb} micro-batches per step is not "
                              f"a multiple of parallel.pipeline={p.pipeline} (looped models run "
                              "megatron's interleaved schedule, one virtual chunk per loop)",
                              "use a global batch giving a multiple of pipeline micro-batches")
    if m.attention_dropout > 0:
        raise ConfigError("model.attention_dropout", "looped models' attention (SDPA, G-SWA "
                          "and their kernels) has no dropout", "set model.attention_dropout=0")
    if m.backend == Backend.te:
        raise ConfigError("model.backend", "looped models use their own attention (local "
                          "backend only)", "set model.backend=auto or local")
