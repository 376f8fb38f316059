"""Validation that runs before any process group starts.

Every error names the field, what is wrong and how to fix it, so a bad launch fails in a
second with one readable line instead of a hang or a traceback from inside megatron-core.
"""
from __future__ import annotations

import torch

from plt_train.config.megatron import SWIGLU_FUSIONS
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
    if m.swiglu_fusion not in SWIGLU_FUSIONS:
        raise ConfigError("model.swiglu_fusion", f"unknown {m.swiglu_fusion!r}",
                          ", ".join(SWIGLU_FUSIONS))
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
    if p.context > 1:
        # Megatron's process groups and TE attention support it, but the training step does
        # not yet cut each batch into this rank's sequence slices (megatron's
        # get_batch_on_this_cp_rank) nor reduce the loss over data x context ranks: every
        # rank would read the whole sequence as if it were its slice of a longer one.
        raise ConfigError("parallel.context", "context parallelism is not wired into the "
                          "training step yet (batches are not split across context ranks)",
                          "set parallel.context=1")
    if m.ffn_hidden_size is not None and m.moe.layer == "dense" and (
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
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("train.precision", f"unknown {t.precision!r}", "auto, fp32 or bf16")
    if t.log_interval < 1:
        raise ConfigError("train.log_interval", f"must be >= 1, got {t.log_interval}",
                          "1 logs every step")
    if t.eval_interval < 0:
        raise ConfigError("train.eval_interval", "must be >= 0", "0 disables validation")
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
    if o.decay_style not in ("cosine", "linear", "constant", "inverse-square-root"):
        raise ConfigError("optim.decay_style", f"unknown {o.decay_style!r}",
                          "cosine, linear, constant or inverse-square-root")
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
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}",
                          "use e.g. 0.1, or 0 for none")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise ConfigError("logging.wandb_mode", f"unknown {cfg.logging.wandb_mode!r}",
                          "offline, online or disabled")
    _validate_loops(cfg, dp)
    if cfg.checkpoint.save_interval < 0:
        raise ConfigError("checkpoint.save_interval", "must be >= 0", "0 disables periodic saves")
    _validate_moe(cfg, world_size)


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


def _validate_loops(cfg: RunConfig, data_parallel: int) -> None:
    """Looped decoders (model.name vanilla / looped / plt)."""
    m, p = cfg.model, cfg.parallel
    if m.loops < 1:
        raise ConfigError("model.loops", f"must be >= 1, got {m.loops}", "set model.loops=1 or more")
    if m.name == "gpt" and m.loops != 1:
        raise ConfigError("model.loops", f"{m.loops} loops need a looped model",
                          "set model.name=looped or model.name=plt")
    if m.name == "vanilla" and m.loops != 1:
        raise ConfigError("model.loops", "vanilla runs its block once",
                          "set model.name=looped or model.name=plt, or model.loops=1")
    if m.name not in ("vanilla", "looped", "plt"):
        return
    if m.loop.window < 1:
        raise ConfigError("model.loop.window", f"must be >= 1, got {m.loop.window}",
                          "use the paper's 64")
    if m.loop.gate not in ("query", "input"):
        raise ConfigError("model.loop.gate", f"unknown gate {m.loop.gate!r}", "query or input")
    _validate_kernel_choice("model.loop.kernel", m.loop.kernel)
    t = cfg.train
    if p.pipeline > 1 and m.loops > 1 and m.name != "vanilla":
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
    if m.backend == "te":
        raise ConfigError("model.backend", "looped models use their own attention (local "
                          "backend only)", "set model.backend=auto or local")


def _validate_moe(cfg: RunConfig, world_size: int) -> None:
    """Mixture-of-experts MLPs (``model.moe``, plt_train/models/moe)."""
    from plt_train.models.common.backends import have_transformer_engine

    m, p, moe = cfg.model, cfg.parallel, cfg.model.moe
    if moe.layer not in ("dense", "fine_grained", "bigmac"):
        raise ConfigError("model.moe.layer", f"unknown layer {moe.layer!r}",
                          "dense, fine_grained or bigmac")
    if moe.layer == "dense":
        if p.expert > 1:
            raise ConfigError("parallel.expert", f"expert parallelism ({p.expert}) needs MoE "
                              "layers, the model is dense",
                              "set model.moe.layer=fine_grained or bigmac, or parallel.expert=1")
        return
    if moe.num_experts < 1:
        raise ConfigError("model.moe.num_experts", f"must be >= 1, got {moe.num_experts}",
                          "the paper uses 64")
    if moe.num_experts % p.expert:
        raise ConfigError("model.moe.num_experts", f"{moe.num_experts} experts are not "
                          f"divisible by parallel.expert={p.expert} (each expert-parallel rank "
                          "holds the same number of experts)",
                          f"use a multiple of {p.expert} experts or an expert-parallel size "
                          f"that divides {moe.num_experts}")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError("model.moe.top_k", f"{moe.top_k} is not in [1, num_experts="
                          f"{moe.num_experts}]", "route each token to 1..num_experts experts")
    width = moe.ratio * m.hidden_size
    if moe.ratio <= 0 or abs(width - round(width)) > 1e-6 or round(width) < 1:
        raise ConfigError("model.moe.ratio", f"r * hidden_size = {moe.ratio} * {m.hidden_size} "
                          f"= {width:g} is not a positive whole number",
                          "pick r so that r * hidden_size is an integer (the expert width)")
    if moe.activation not in ("swiglu", "relu"):
        raise ConfigError("model.moe.activation", f"unknown {moe.activation!r}", "swiglu or relu")
    if moe.expert_gemm not in ("auto", "grouped", "loop", "te"):
        raise ConfigError("model.moe.expert_gemm", f"unknown {moe.expert_gemm!r}",
                          "auto, grouped, loop or te")
    if moe.expert_gemm == "te" and not have_transformer_engine():
        raise ConfigError("model.moe.expert_gemm", "te requested but Transformer Engine is not "
                          "installed", "use model.moe.expert_gemm=auto")
    _validate_kernel_choice("model.moe.dcca_kernel", moe.dcca_kernel)
    from plt_train.models.moe.wire import WIRE_FORMATS
    if moe.wire_format not in WIRE_FORMATS:  # at EP = 1 any format is a no-op (no wire)
        raise ConfigError("model.moe.wire_format", f"unknown {moe.wire_format!r}",
                          ", ".join(WIRE_FORMATS))
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError("model.moe.capacity_factor", f"must be > 0, got {moe.capacity_factor}",
                          "use e.g. 1.2, or null for dropless routing")
    if moe.aux_loss_coeff < 0:
        raise ConfigError("model.moe.aux_loss_coeff", "must be >= 0", "the paper uses 1e-3")
    if moe.num_shared_experts < 0:
        raise ConfigError("model.moe.num_shared_experts", "must be >= 0", "0 disables them")
    if moe.router_score_function not in ("softmax", "sigmoid"):
        raise ConfigError("model.moe.router_score_function",
                          f"unknown {moe.router_score_function!r}", "softmax or sigmoid")
    if p.tensor > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", "MoE layers with tensor parallelism "
                          "need sequence parallelism (megatron-core refuses TP without it)",
                          "set parallel.sequence_parallel=true")
    if p.context > 1:
        raise ConfigError("parallel.context", "our MoE layers are not tested with context "
                          "parallelism", "set parallel.context=1")


def _validate_kernel_choice(key: str, choice: str) -> None:
    """auto | triton | torch; "triton" must be usable on the device this run will get."""
    from kernels import KERNEL_CHOICES, triton_unusable_reason

    if choice not in KERNEL_CHOICES:
        raise ConfigError(key, f"unknown {choice!r}", ", ".join(KERNEL_CHOICES))
    if choice == "triton":
        why = triton_unusable_reason("cuda" if torch.cuda.is_available() else "cpu")
        if why:
            raise ConfigError(key, f"triton requested but {why}", f"use {key}=auto")
