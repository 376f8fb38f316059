"""The checks of a run's layout, batch, optimizer, data split and logging, before any
process group starts.

Every error names the field, what is wrong and how to fix it, so a bad launch fails in a
second with one readable line instead of a hang or a traceback from inside megatron-core.
What depends on a model family (loops, G-SWA, MoE, backends and kernels installed) is checked
beside that family: ``plt_train.models.validate`` runs these checks and then those.
"""
from __future__ import annotations

from plt_train.config.errors import ConfigError
from plt_train.config.schema import (
    DecayStyle, MLPLayer, Recompute, RecomputeModule, RunConfig, check_choices,
)


def derived_data_parallel(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor * p.pipeline * p.context)


def _at_least(key: str, value, low, fix: str) -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}", fix)


def _in_unit_interval(key: str, value: float, fix: str) -> None:
    """``value`` in [0, 1)."""
    if not 0 <= value < 1:
        raise ConfigError(key, f"must be in [0, 1), got {value}", fix)


def _check_ranges(cfg: RunConfig) -> None:
    """Single values out of range, checked first: later checks divide by some of them."""
    m, o, t, s = cfg.model, cfg.optim, cfg.train, cfg.sample
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        _at_least(f"model.{name}", getattr(m, name), 1, f"set model.{name}")
    if m.num_query_groups is not None:
        _at_least("model.num_query_groups", m.num_query_groups, 1,
                  "null uses one group per head (plain multi-head attention)")
    _at_least("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, 1,
              "1 keeps the vocabulary as it is")
    for name in ("attention_dropout", "hidden_dropout"):
        _in_unit_interval(f"model.{name}", getattr(m, name), "0 disables dropout")
    if not o.lr > 0:
        raise ConfigError("optim.lr", f"must be > 0, got {o.lr}", "use e.g. 3e-4")
    _in_unit_interval("optim.beta1", o.beta1, "AdamW's usual value is 0.9")
    _in_unit_interval("optim.beta2", o.beta2, "AdamW's usual values are 0.95-0.999")
    if not o.eps > 0:
        raise ConfigError("optim.eps", f"must be > 0, got {o.eps}", "use e.g. 1e-8")
    _at_least("optim.clip_grad", o.clip_grad, 0, "0 disables clipping")
    _at_least("train.seed", t.seed, 0, "use a non-negative integer")
    _at_least("data.num_workers", cfg.data.num_workers, 0, "0 loads in the training process")
    if not cfg.parallel.timeout_s > 0:
        raise ConfigError("parallel.timeout_s", f"must be > 0, got {cfg.parallel.timeout_s}",
                          "use e.g. 600 (seconds)")
    if not cfg.checkpoint.save_timeout_s > 0:
        raise ConfigError("checkpoint.save_timeout_s", "must be > 0, got "
                          f"{cfg.checkpoint.save_timeout_s}", "use e.g. 1200 (seconds)")
    if s.prompt is not None:
        _at_least("sample.max_new_tokens", s.max_new_tokens, 1,
                  "generate at least one token, or sample.prompt=null for no sample")
        _at_least("sample.temperature", s.temperature, 0, "0 is greedy")
        if not 0 < s.top_p <= 1:
            raise ConfigError("sample.top_p", f"must be in (0, 1], got {s.top_p}",
                              "1 samples from the whole distribution")


def _check_recompute(cfg: RunConfig) -> None:
    rc, m = cfg.model.recompute, cfg.model
    key = "model.recompute"
    allowed = ", ".join(x.value for x in RecomputeModule)
    for name in rc.modules:
        if name not in RecomputeModule.__members__:
            raise ConfigError(f"{key}.modules", f"unknown module {name!r}", f"use any of {allowed}")
    if rc.granularity == Recompute.selective:
        if not rc.modules:
            raise ConfigError(f"{key}.modules", "is empty with granularity=selective",
                              f"name some of {allowed}, or granularity=none")
        dense = m.moe.layer == MLPLayer.dense
        wrong = "moe" if dense and "moe" in rc.modules else (
            "mlp" if not dense and "mlp" in rc.modules else None)
        if wrong:
            kind = "dense MLPs" if dense else "MoE layers"
            raise ConfigError(f"{key}.modules", f"{wrong!r} does not apply: the model has {kind}",
                              "use 'mlp' for dense layers, 'moe' for MoE layers")
    if rc.num_layers is not None:
        if rc.granularity != Recompute.full:
            raise ConfigError(f"{key}.num_layers", "applies to granularity=full only",
                              "set granularity=full, or num_layers=null")
        per_stage = m.num_layers // max(cfg.parallel.pipeline, 1)
        if not 1 <= rc.num_layers <= per_stage:
            raise ConfigError(f"{key}.num_layers", f"must be in [1, {per_stage}] (the layers "
                              f"of a pipeline stage), got {rc.num_layers}",
                              "null recomputes every layer")


def _check_mixtures(cfg: RunConfig) -> None:
    """The shape of ``data.mixture`` / ``data.valid_mixture`` (the files: ``check_data``)."""
    d = cfg.data
    if d.prefix and d.mixture:
        raise ConfigError("data.mixture", "is set together with data.prefix",
                          "use one: data.prefix=null for a mixture, or data.mixture=[]")
    if d.valid_mixture and not (d.prefix or d.mixture):
        raise ConfigError("data.valid_mixture", "needs training data from data.prefix or "
                          "data.mixture (the embedded corpus has its own tokenizer)",
                          "set data.prefix or data.mixture, or data.valid_mixture=[]")
    for name in ("mixture", "valid_mixture"):
        for i, member in enumerate(getattr(d, name)):
            key = f"data.{name}[{i}]"
            if not member.prefix:
                raise ConfigError(f"{key}.prefix", "is empty", "give the dataset's prefix "
                                  "(<prefix>.bin / .idx), as written by plt-preprocess")
            if not member.weight > 0:
                raise ConfigError(f"{key}.weight", f"must be > 0, got {member.weight}",
                                  "drop the member to leave it out")


def _check_downstream(cfg: RunConfig) -> None:
    """The in-training evaluation's numbers and layout (its task names need the harness:
    ``evaluation.downstream.check_tasks``, called by train.py beside the data checks)."""
    d, p = cfg.downstream, cfg.parallel
    if not d.tasks:
        return
    _at_least("downstream.interval", d.interval, 0, "0 turns the evaluation off")
    _at_least("downstream.batch_size", d.batch_size, 1, "use e.g. 8")
    if d.limit is not None:
        _at_least("downstream.limit", d.limit, 1, "null evaluates every document")
    if d.num_fewshot is not None:
        _at_least("downstream.num_fewshot", d.num_fewshot, 0, "null keeps each task's own")
    if d.interval and (p.tensor > 1 or p.pipeline > 1):
        raise ConfigError("downstream.tasks", f"the in-training evaluation needs whole layers "
                          f"on every rank (TP = PP = 1), got TP={p.tensor}, PP={p.pipeline}",
                          "evaluate the run's checkpoints with plt-eval RUN_DIR --tasks ..., "
                          "or downstream.interval=0")


def validate(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError for the first problem found."""
    check_choices(cfg)
    _check_ranges(cfg)
    _check_recompute(cfg)
    _check_mixtures(cfg)
    _check_downstream(cfg)
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
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"num_attention_heads={m.num_attention_heads}",
                          "pick a hidden size that is a multiple of the head count")
    groups = m.query_groups
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
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        raise ConfigError("parallel.overlap_param_gather", "needs the distributed optimizer "
                          "and overlapped gradient reduce (as in Megatron-LM)",
                          "also set parallel.use_distributed_optimizer=true and "
                          "parallel.overlap_grad_reduce=true")
    if p.bucket_size is not None and p.bucket_size < 1:
        raise ConfigError("parallel.bucket_size", f"must be >= 1, got {p.bucket_size}",
                          "null for megatron's default")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor parallelism",
                          "set parallel.tensor>1 or parallel.sequence_parallel=false")
    if p.sequence_parallel and m.seq_length % p.tensor:
        raise ConfigError("model.seq_length", f"{m.seq_length} is not divisible by "
                          f"parallel.tensor={p.tensor} (sequence parallel)", "adjust seq_length")
    if p.context > 1:
        # Megatron's process groups and TE attention support it, but the training step does
        # not yet cut each batch into this rank's sequence slices (megatron's
        # get_batch_on_this_cp_rank) nor reduce the loss over data x context ranks: every
        # rank would read the whole sequence as if it were its slice of a longer one.
        raise ConfigError("parallel.context", "context parallelism is not wired into the "
                          "training step yet (batches are not split across context ranks)",
                          "set parallel.context=1")
    if m.ffn_hidden_size is not None and m.moe.layer == MLPLayer.dense and (
            m.ffn_hidden_size < 1 or m.ffn_hidden_size % p.tensor):  # the dense MLP's width
        raise ConfigError("model.ffn_hidden_size", f"{m.ffn_hidden_size} is not a positive "
                          f"multiple of parallel.tensor={p.tensor}",
                          "use a multiple of the TP size, or null for the default")
    if m.seq_length < 1:
        raise ConfigError("model.seq_length", f"must be >= 1, got {m.seq_length}",
                          "set model.seq_length")
    if m.vocab_size is not None and m.vocab_size < 1:
        raise ConfigError("model.vocab_size", f"must be >= 1, got {m.vocab_size}",
                          "null uses the tokenizer's vocabulary")
    if m.vocab_size is not None and cfg.data.prefix is None and cfg.data.tokenizer is None \
            and m.vocab_size < cfg.data.vocab_size:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is smaller than the embedded "
                          f"corpus' BPE vocabulary (data.vocab_size={cfg.data.vocab_size})",
                          "raise it, or null for the tokenizer's vocabulary")
    if m.loops < 1:
        raise ConfigError("model.loops", f"must be >= 1, got {m.loops}",
                          "set model.loops=1 or more")
    for name in ("micro_batch_size", "global_batch_size"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(t, name)}",
                              f"set train.{name}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not a multiple "
                          f"of micro_batch_size({t.micro_batch_size}) x data parallel({dp})",
                          f"use a multiple of {t.micro_batch_size * dp}")
    if t.steps < 1:
        raise ConfigError("train.steps", f"must be >= 1, got {t.steps}", "set train.steps")
    if t.log_interval < 1:
        raise ConfigError("train.log_interval", f"must be >= 1, got {t.log_interval}",
                          "1 logs every step")
    if t.eval_interval < 0:
        raise ConfigError("train.eval_interval", "must be >= 0", "0 disables validation")
    if t.max_skipped_steps < 0:
        raise ConfigError("train.max_skipped_steps", f"must be >= 0, got {t.max_skipped_steps}",
                          "0 stops at the first non-finite step")
    if t.spike_zscore < 0:
        raise ConfigError("train.spike_zscore", f"must be >= 0, got {t.spike_zscore}",
                          "0 disables the loss-spike report")
    if t.spike_zscore > 0 and t.spike_window < 2:
        raise ConfigError("train.spike_window", f"must be >= 2, got {t.spike_window}",
                          "e.g. 100 steps")
    if t.eval_interval > 0 and t.eval_iters < 1:
        raise ConfigError("train.eval_iters", "must be >= 1 when eval_interval > 0",
                          "set train.eval_iters or train.eval_interval=0")
    split = split_weights(cfg.data.split)
    if split[0] == 0:
        raise ConfigError("data.split", f"{cfg.data.split!r} gives the train split no "
                          "documents", "give the first weight a share (e.g. 98,2,0)")
    if t.eval_interval > 0 and split[1] == 0:
        raise ConfigError("data.split", f"{cfg.data.split!r} gives the validation split no "
                          "documents, but train.eval_interval > 0 asks for validation",
                          "give the second weight a share (e.g. 98,2,0) or train.eval_interval=0")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", f"{o.min_lr} must be in [0, lr={o.lr}]", "lower it")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", "must be >= 0", "0 starts at the full lr")
    if o.decay_steps is not None and o.decay_steps < 1:
        raise ConfigError("optim.decay_steps", f"must be >= 1, got {o.decay_steps}",
                          "null decays over train.steps")
    decay = o.decay_steps or t.steps
    if o.warmup_steps >= decay:  # megatron's scheduler asserts warmup < decay
        raise ConfigError("optim.warmup_steps", f"{o.warmup_steps} is not below the decay "
                          f"steps ({decay}: optim.decay_steps, else train.steps)",
                          f"use at most {decay - 1} warmup steps")
    if o.decay_style == DecayStyle.wsd and not (
            o.wsd_decay_steps is not None and 1 <= o.wsd_decay_steps <= decay - o.warmup_steps):
        raise ConfigError("optim.wsd_decay_steps", f"{o.wsd_decay_steps} with "
                          "decay_style=wsd: must be between 1 and the decay steps after warmup "
                          f"({decay} - {o.warmup_steps})", "e.g. a tenth to a fifth of the run")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}",
                          "use e.g. 0.1, or 0 for none")
    if cfg.checkpoint.save_interval < 0:
        raise ConfigError("checkpoint.save_interval", "must be >= 0", "0 disables periodic saves")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}",
                          "null keeps every checkpoint")


def split_weights(split: str) -> list[float]:
    """``"train,valid,test"`` weights (missing ones are 0).  The data build reads the split
    through this too (``_check_split`` in data/datasets.py), so both accept the same strings."""
    try:
        weights = [float(w) for w in split.split(",")]
    except ValueError:
        raise ConfigError("data.split", f"{split!r} is not comma-separated numbers",
                          "use e.g. 98,2,0") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError("data.split", f"{split!r} is not up to 3 non-negative weights with "
                          "a positive sum", "use e.g. 98,2,0")
    return weights + [0.0] * (3 - len(weights))
