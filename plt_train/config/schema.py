"""Typed run configuration: the single source of truth for every knob.

Each group mirrors a Hydra config group under ``configs/`` (model, parallel, data, optim,
train, checkpoint, logging, sample).  YAML files only override these defaults; an unknown key
or a wrong type is a Hydra error because the schema is registered in the ConfigStore
(``store.py``).  Each field's docstring (the string under it) says what it does.

Every choice is an ``enum.StrEnum`` defined here and nowhere else: omegaconf checks a YAML or
command-line value against it (``Invalid value 'x', expected one of [...]``, naming the key),
a dataclass built in Python gets its strings converted in ``__post_init__`` (an unknown one
raises ``ConfigError`` naming the field and the choices), and a member still compares equal
to its string (``moe.layer == "bigmac"``).  YAML reads a bare ``on`` / ``off`` as a boolean:
quote them (``swiglu_fusion: "on"``); on the command line ``model.swiglu_fusion=on`` works.

Choices where the issues were silent follow Megatron-LM conventions: ``global_batch_size``
is in sequences, learning-rate steps are optimizer steps, ``ffn_hidden_size`` defaults to the
Llama rule (8/3 * hidden, rounded up to a multiple of 64) for SwiGLU.

This package is a leaf: it imports nothing from the rest of plt_train (nor torch or
megatron), so validating or sizing a config (``plt-dryrun``) is cheap.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from plt_train.config.errors import ConfigError


# -- the choices ---------------------------------------------------------------------------
class ModelName(enum.StrEnum):
    """The decoder family (``plt_train.models.FAMILIES``)."""

    gpt = "gpt"  # megatron-core's GPTModel with our layer specs
    vanilla = "vanilla"  # our looped decoder run once: the same function as gpt
    looped = "looped"  # loop r feeds loop r+1 at the same position
    plt = "plt"  # Parallel Loop Transformer: shifted cross-loop input, shared KV + G-SWA


class GateInput(enum.StrEnum):
    """What G-SWA's per-head gate reads (``models/plt/gate.py``)."""

    query = "query"  # the post-RoPE query of the head: sigmoid(q_h . w_h + b_h)
    input = "input"  # the normed layer input: sigmoid(Linear(RMSNorm(x)))


class KernelChoice(enum.StrEnum):
    """Fused Triton kernel or pure-torch reference (``plt_train/kernels/__init__.py``)."""

    auto = "auto"  # Triton on CUDA once the kernel passed its first-use check, else torch
    triton = "triton"  # required (on CPU only under TRITON_INTERPRET=1, for tests)
    torch = "torch"  # never Triton


class MLPLayer(enum.StrEnum):
    """The MLP of every decoder layer (``plt_train/models/moe``)."""

    dense = "dense"  # the SwiGLU MLP
    fine_grained = "fine_grained"  # CDAC: top-k of small experts h -> r*h -> h
    bigmac = "bigmac"  # DCCA: descend to r*h, experts r*h -> h -> r*h, ascend after


class ExpertActivation(enum.StrEnum):
    swiglu = "swiglu"  # 3 matrices per expert, like the rest of the model
    relu = "relu"  # the BigMac paper's ReLU-like MLP: 2 matrices


class ExpertGemm(enum.StrEnum):
    """How the routed experts multiply (``models/moe/experts.py``)."""

    auto = "auto"  # te with the TE backend, else grouped where it runs, else loop
    grouped = "grouped"  # torch._grouped_mm
    loop = "loop"  # one matmul per expert: the reference
    te = "te"  # Transformer Engine's grouped GEMM


class RouterScore(enum.StrEnum):
    """megatron-core ``TopKRouter``'s score function."""

    softmax = "softmax"
    sigmoid = "sigmoid"


class WireFormat(enum.StrEnum):
    """Number format of the expert-parallel all-to-all (``models/moe/wire.py``)."""

    native = "native"  # the activations' dtype
    bf16 = "bf16"  # all four all-to-alls in bfloat16
    fp8 = "fp8"  # DeepSeek-V3: dispatch forward in float8 e4m3 (1x128 tile scales), rest bf16


class Backend(enum.StrEnum):
    """Layer-spec provider (``models/common/backends.py``)."""

    auto = "auto"  # te when Transformer Engine imports and CUDA is present, else local
    local = "local"  # pure torch + megatron-core, SDPA attention
    te = "te"  # Transformer Engine


class Recompute(enum.StrEnum):
    """Activation recomputation (``model.recompute.granularity``)."""

    none = "none"  # keep every activation the backward pass needs
    selective = "selective"  # recompute the parts named in ``model.recompute.modules``
    full = "full"  # keep only each layer's input; rerun the layer in the backward pass


class RecomputeModule(enum.StrEnum):
    """What ``selective`` recomputes (megatron-core's ``recompute_modules`` names)."""

    core_attn = "core_attn"  # the attention proper (softmax(QK^T)V; G-SWA's two branches)
    layernorm = "layernorm"  # the input and pre-MLP norms
    mlp = "mlp"  # the dense MLP
    moe = "moe"  # the whole MoE layer (router, all-to-alls, experts)


class Switch(enum.StrEnum):
    """An optional speed-up: the device's default, or forced."""

    auto = "auto"  # on with CUDA, off on CPU
    on = "on"
    off = "off"


class Precision(enum.StrEnum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class DecayStyle(enum.StrEnum):
    """megatron-core ``OptimizerParamScheduler``'s lr decay after warmup (the member's value
    is megatron's spelling; configs write the name)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    inverse_square_root = "inverse-square-root"
    wsd = "WSD"  # warmup-stable-decay: max lr until the last optim.wsd_decay_steps, then decay


class WsdDecayStyle(enum.StrEnum):
    """The shape of WSD's final decay (megatron-core's ``lr_wsd_decay_style``)."""

    linear = "linear"
    cosine = "cosine"
    exponential = "exponential"
    minus_sqrt = "minus_sqrt"


class WandbMode(enum.StrEnum):
    offline = "offline"  # files under the run directory, no network
    online = "online"
    disabled = "disabled"


# -- choice checking ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _choice_fields(cls) -> dict:
    """{field name: StrEnum type} of a config dataclass (Optional[...] unwrapped)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], enum.StrEnum):
            out[name] = args[0]
    return out


def as_choice(kind: type, value, key: str):
    """``value`` as a member of the StrEnum ``kind`` (None stays None), or ConfigError."""
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        try:
            return kind[value]  # the member's name, as omegaconf accepts it
        except KeyError:
            allowed = ", ".join(m.name for m in kind)
            raise ConfigError(key, f"unknown value {value!r}", f"use one of {allowed}") from None


class _Section:
    """Base of the config groups: choice fields given as strings become their StrEnum."""

    group_path: ClassVar[str] = ""  # where the group lives in RunConfig, for error messages

    def __post_init__(self) -> None:
        for name, kind in _choice_fields(type(self)).items():
            value = as_choice(kind, getattr(self, name), f"{self.group_path}.{name}")
            setattr(self, name, value)


def check_choices(section, path: str = "") -> None:
    """Raise ConfigError for any choice field of ``section`` (and the groups inside it)
    holding a value outside its StrEnum: a field assigned after construction skips
    ``__post_init__``."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{path}.{f.name}" if path else f.name
        kind = _choice_fields(type(section)).get(f.name)
        if kind is not None:
            as_choice(kind, value, key)
        elif dataclasses.is_dataclass(value):
            check_choices(value, key)


# -- the groups ------------------------------------------------------------------------------
@dataclass
class LoopConfig(_Section):
    """Looped decoders (``model.name`` looped or plt): one shared block run ``model.loops``
    times.  The window, the gate and feeding the normed output of a non-final loop follow the
    released PLT code (docs/design/architectures.md)."""

    group_path: ClassVar[str] = "model.loop"

    window: int = 64
    """G-SWA: each later loop attends to its own last ``window`` tokens (the current one
    included)."""
    gate: GateInput = GateInput.query
    """What the per-head G-SWA gate reads."""
    shared_kv: bool = True
    """PLT's efficient representation: later loops attend to loop 1's K/V (plus, with
    ``gswa``, a window of their own), so only loop 1 keeps a full KV cache.  False: cross-loop
    parallelism alone, every loop attending to its own full K/V as in a looped model (decode
    still runs all loops in one pass; the KV cache is R x vanilla's).  The paper's ablation
    step between looped and PLT; ``gswa``, ``window``, ``gate`` and ``detach_kv`` need it."""
    gswa: bool = True
    """False: later loops attend to loop 1's K/V only (no window branch, no gate)."""
    detach_kv: bool = True
    """Later loops see loop 1's K/V as constants (no gradient into them).  No public training
    code shows which the paper did: an open choice (the flagship preset turns it off)."""
    emb_scale: float = 1.0
    """Loop r >= 2 input: ``emb_scale * Embed(x) + hidden_scale * shift(h^(r-1))``."""
    hidden_scale: float = 0.02
    """See ``emb_scale``.  0.02 puts the fed-on state (normed: RMS 1) at the embedding's
    scale (init std ``init_method_std`` 0.02), so a later loop's own token stays a large part
    of its input, which a lookup of that token needs.  Measured at d=128 (docs/benchmarks.md,
    issue 19): at 1.0 (the released code's form) the token is ~1/50 of the input, cross-loop
    models stayed at chance on the recall task and PLT-2 ended ~1 nat behind on language
    modelling; at 0.05 (the default until 2026-12-06) PLT-2 was level with looped-2 on
    language modelling; at 0.02 it is level with or ahead of the twice-as-deep vanilla and,
    over one layer, learns the recall task fastest.  Relative to ``init_method_std``: a model initialised at
    another scale wants another value."""
    norm_between_loops: Optional[bool] = None
    """Feed a non-final loop's output on through the shared final norm (True) or raw
    (False).  None: each model's own form (``ModelConfig.normed_loop_feed``): raw for
    ``looped``, the textbook looped transformer whose loop r continues loop r-1's residual
    stream; normed for ``plt``, the released PLT code's form, which ``hidden_scale`` brings
    back to the embeddings' scale.  A looped model has no such scale: fed normed (RMS 1,
    against loop 1's input at the embeddings' RMS ~0.02), its block's update is ~1 % of
    loop 2's input at init, and looped-2 trained level with the single pass it loops
    (docs/benchmarks.md, issue 19)."""
    kernel: KernelChoice = KernelChoice.auto
    """Attention kernels of the later loops: fused G-SWA in training and prefill, one launch
    per layer in decode."""


@dataclass
class RecomputeConfig(_Section):
    """Activation recomputation: trade compute for activation memory (megatron-core's
    ``recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers`` /
    ``recompute_modules``; torchtitan's ``activation_checkpoint.mode``).  Looped models
    recompute per layer per loop (``models/plt/recompute.py``); loss and gradients are those
    of the run without it, dropout included (megatron's checkpoint restores the RNG states)."""

    group_path: ClassVar[str] = "model.recompute"

    granularity: Recompute = Recompute.none
    modules: list = field(default_factory=lambda: ["core_attn"])
    """With ``selective``: any of core_attn, layernorm, mlp, moe (``RecomputeModule``)."""
    num_layers: Optional[int] = None
    """With ``full``: recompute only the first this many layers of each pipeline stage
    (megatron's ``block`` method), keeping the rest; None: every layer (megatron's
    ``uniform`` method, one layer per unit)."""


@dataclass
class MoEConfig(_Section):
    """Mixture-of-experts MLPs (BigMac, arXiv 2502.16927). ``layer: dense`` keeps the SwiGLU MLP.

    * ``fine_grained`` (CDAC, DeepSeekMoE style): top-k over ``num_experts`` small experts
      ``h -> r*h -> h``; tokens cross the expert-parallel all-to-all at width h.
    * ``bigmac`` (DCCA): one shared descend projection ``h -> r*h`` before dispatch, experts
      ``r*h -> h -> r*h`` (same parameters and FLOPs as a fine-grained expert), all-to-all at
      width r*h both ways, gate-weighted sum at r*h, one ascend projection ``r*h -> h``.

    Defaults are the paper's (r = 0.25, 64 experts, top-8, aux loss 1e-3, capacity factor 1.2).
    Where the paper is silent we follow Megatron-LM: softmax-then-top-k router in fp32, the
    Switch-style load-balancing loss, drop by router probability.
    """

    group_path: ClassVar[str] = "model.moe"

    layer: MLPLayer = MLPLayer.dense
    """The MLP of every layer."""
    num_experts: int = 64
    top_k: int = 8
    """Experts each token is routed to."""
    ratio: float = 0.25
    """r: each expert's width (and BigMac's latent width) is r * hidden_size, a whole number."""
    activation: ExpertActivation = ExpertActivation.swiglu
    """The experts' MLP, the same for both layer types."""
    num_shared_experts: int = 0
    """DeepSeekMoE shared experts: an always-on SwiGLU MLP of width num_shared_experts * r * h
    on the full-width hidden state, added to the routed output (bigmac too)."""
    aux_loss_coeff: float = 1e-3
    """Switch load-balancing loss (megatron's "aux_loss"); 0 turns it off."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss (ST-MoE); None turns it off."""
    capacity_factor: Optional[float] = 1.2
    """Expert capacity = ceil(tokens * top_k / num_experts * factor) of each rank's tokens, as
    in megatron-core; over-capacity assignments with the lowest router probability drop.
    None: dropless (every assignment is computed)."""
    router_score_function: RouterScore = RouterScore.softmax
    expert_bias: bool = False
    """Auxiliary-loss-free load balancing (DeepSeek-V3; megatron-core's
    ``moe_router_enable_expert_bias``): a per-expert bias added to the routing scores when
    choosing the top-k (not to the combine weights), moved by ``bias_update_rate`` after every
    optimizer step, up for experts that got fewer tokens than the mean of the global batch and
    down for those that got more (counts summed over TP x DP, expert-parallel ranks included).
    A buffer, saved in checkpoints.  Needs ``router_score_function=sigmoid`` (as megatron);
    usually with ``aux_loss_coeff`` 0 or small."""
    bias_update_rate: float = 1e-3
    """The expert bias's step per optimizer step (DeepSeek-V3's gamma)."""
    router_pre_softmax: bool = False
    """Softmax over all experts before top-k (else after)."""
    expert_gemm: ExpertGemm = ExpertGemm.auto
    """How the routed experts multiply."""
    dcca_kernel: KernelChoice = KernelChoice.auto
    """The fused (un)permutation kernels (``plt_train/kernels/dcca.py``): for bigmac the DCCA
    dispatch / combine (descend + permute, gather-sum + ascend), for fine_grained the
    gate-weighted gather-sum combine in place of megatron's unpermute."""
    wire_format: WireFormat = WireFormat.native
    """Number format of the expert-parallel all-to-all."""


@dataclass
class ModelConfig(_Section):
    """A GPT-style decoder: RMSNorm, RoPE, SwiGLU, no biases."""

    group_path: ClassVar[str] = "model"

    name: ModelName = ModelName.gpt
    """The decoder family."""
    loops: int = 1
    """R: passes through the shared block (looped and plt; 1 for gpt and vanilla)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    compile: bool = False
    """Compile each transformer layer with ``torch.compile`` (torchtitan's per-block compile;
    ``models/compile.py``).  Not part of the model's identity: a run may resume with it
    switched.  On CPU inductor builds C++ (a compiler must be installed)."""
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    """Grouped-query attention; None: one group per head."""
    ffn_hidden_size: Optional[int] = None
    """The dense MLP's width; None: 8/3 * hidden_size rounded up to 64 (Llama)."""
    seq_length: int = 256
    vocab_size: Optional[int] = None
    """Embedding rows before padding: None takes the tokenizer's vocabulary; a larger value
    leaves room for tokens added later."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (not times TP, unlike Megatron-LM)."""
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    backend: Backend = Backend.auto
    """Layer-spec provider."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    swiglu_fusion: Switch = Switch.auto
    """SwiGLU as one fused kernel forward and one backward (megatron-core's
    ``bias_swiglu_impl``, i.e. TransformerConfig.bias_activation_fusion: torch.compile'd) in
    the dense MLPs and the routed experts.  auto: on with CUDA (Megatron-LM's default), off
    on CPU, where torch.compile builds C++ for every new shape."""

    # -- derived ----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """The dense MLP's width: ``ffn_hidden_size``, else Llama's rule (2/3 of 4h, equal
        parameters to a 4h GELU MLP, rounded up to 64)."""
        return self.ffn_hidden_size or 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def expert_width(self) -> int:
        """r * h: the fine-grained expert's hidden width and BigMac's latent width."""
        return int(round(self.moe.ratio * self.hidden_size))

    @property
    def parallel_loops(self) -> bool:
        """PLT with R > 1: loops r >= 2 take the shifted input, so a decode step runs every
        loop in one pass, and they attend to loop 1's K/V instead of keeping their own."""
        return self.name == ModelName.plt and self.loops > 1

    @property
    def normed_loop_feed(self) -> bool:
        """Whether a non-final loop's output goes on through the final norm:
        ``loop.norm_between_loops``, or where that is None, this model's own form (normed
        for plt, raw for looped)."""
        if self.loop.norm_between_loops is not None:
            return self.loop.norm_between_loops
        return self.name == ModelName.plt

    @property
    def shares_kv(self) -> bool:
        """``parallel_loops`` whose later loops read loop 1's K/V (``loop.shared_kv``)."""
        return self.parallel_loops and self.loop.shared_kv

    @property
    def uses_gswa(self) -> bool:
        """``shares_kv`` with the window branch and its gate (``loop.gswa``)."""
        return self.shares_kv and self.loop.gswa

    def padded_vocab_size(self, tokenizer_vocab: int) -> int:
        """Embedding rows: ``vocab_size`` (else the tokenizer's) padded to a multiple of
        ``make_vocab_size_divisible_by``.  Not times the TP size, as Megatron-LM does: the
        model, and so a checkpoint, stays the same whatever the layout (validation checks
        that the multiple divides by TP instead)."""
        vocab = tokenizer_vocab
        if self.vocab_size is not None:
            if self.vocab_size < tokenizer_vocab:
                raise ConfigError("model.vocab_size", f"{self.vocab_size} is smaller than the "
                                  f"tokenizer's vocabulary ({tokenizer_vocab})",
                                  "raise it, or null for the tokenizer's vocabulary")
            vocab = self.vocab_size
        m = self.make_vocab_size_divisible_by
        return m * math.ceil(vocab / m)


@dataclass
class ParallelConfig(_Section):
    """Megatron-core parallel sizes. Data parallel is derived: world / (tp * pp * cp)."""

    group_path: ClassVar[str] = "parallel"

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    """Expert-parallel ranks: each holds num_experts / expert of the experts, whole."""
    context: int = 1
    """Not wired into the training step yet: validation refuses > 1."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's all-reduce (reduce-scatter with the distributed optimizer)
    during the backward pass, once every parameter in it has its gradient of the step
    (megatron-core DDP; Megatron-LM's --overlap-grad-reduce).  A looped model's block gets its
    gradients from several loops: megatron counts each parameter's gradient-ready events in
    the first step and waits for as many in later ones, so no bucket leaves before the last
    loop's gradient is in (tests/distributed/test_plt_parity.py)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: gather the updated parameters bucket by bucket from
    inside the next forward pass instead of all at once after the optimizer step (Megatron-LM's
    --overlap-param-gather).  Checkpoints, the finite-weights check and the end-of-run sample
    gather them first (``models.parallelize.gather_params``)."""
    bucket_size: Optional[int] = None
    """Parameters per gradient bucket with ``overlap_grad_reduce`` (megatron's
    ``bucket_size``); None: megatron's default, max(40M, 1M x data-parallel size)."""
    data: Optional[int] = None
    """Optional check: if set, must equal the derived data-parallel size."""
    timeout_s: float = 600.0
    """Every collective (of every process group) that waits longer fails with an error naming
    the step, instead of hanging: Megatron-LM's --distributed-timeout-minutes (10).  A rank
    that dies or stalls therefore stops the whole job within about this long."""


@dataclass
class MixtureMember:
    """One dataset of a mixture: Megatron-LM's ``--data-path WEIGHT PREFIX`` pair."""

    prefix: str = ""
    """Megatron indexed dataset prefix (<prefix>.bin / .idx)."""
    weight: float = 1.0
    """Relative share of the samples (the weights of a mixture are normalised)."""


@dataclass
class DataConfig(_Section):
    """Where tokens come from.

    ``prefix`` None selects the embedded corpus: the running interpreter's standard-library
    sources, tokenized with a byte-level BPE trained on them, built once into ``cache_dir``.
    """

    group_path: ClassVar[str] = "data"

    prefix: Optional[str] = None
    """Megatron indexed dataset prefix (<prefix>.bin / .idx)."""
    mixture: List[MixtureMember] = field(default_factory=list)
    """Instead of ``prefix``: several datasets drawn at the given weights (Megatron-LM's
    ``--data-path w1 p1 w2 p2``, through megatron-core's ``BlendedDataset``); ``split`` splits
    each member, so validation mixes the members' validation splits at the same weights.
    ``data.mixture='[{prefix: data/web, weight: 0.7}, {prefix: data/code, weight: 0.3}]'``."""
    valid_mixture: List[MixtureMember] = field(default_factory=list)
    """Validation from these datasets instead of a split of the training data (Megatron-LM's
    ``--valid-data-path``); the training data (``prefix`` or ``mixture``) is then used whole
    and ``split`` is not read."""
    tokenizer: Optional[str] = None
    """A HuggingFace tokenizer.json; None with prefix None: trained on the embedded corpus."""
    vocab_size: int = 8192
    """BPE vocabulary trained for the embedded corpus."""
    split: str = "98,2,0"
    """Train, valid, test weights (Megatron-LM's convention)."""
    cache_dir: str = "~/.cache/plt_train"
    """Where the embedded corpus is built (PLT_TRAIN_CACHE overrides)."""
    num_workers: int = 0


@dataclass
class OptimConfig(_Section):
    """AdamW through megatron-core's optimizer; linear warmup from 0, then decay."""

    group_path: ClassVar[str] = "optim"

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Gradient-norm clip; 0 disables clipping."""
    warmup_steps: int = 20
    decay_style: DecayStyle = DecayStyle.cosine
    decay_steps: Optional[int] = None
    """None: train.steps."""
    wsd_decay_steps: Optional[int] = None
    """``decay_style=wsd``: the last this many of the decay steps anneal to ``min_lr`` (the
    others stay at ``lr``).  On resume a WSD run always takes the config's schedule (its length
    is what one decides late: extend the stable phase by raising ``train.steps``, or anneal
    from any stable checkpoint by giving the new end and ``wsd_decay_steps``)."""
    wsd_decay_style: WsdDecayStyle = WsdDecayStyle.linear
    override_schedule_on_resume: bool = False
    """On resume megatron takes the lr schedule (lr, min_lr, warmup, decay steps and style)
    from the checkpoint, and we print what differs from the config.  True makes the config's
    win instead (Megatron-LM's --override-opt_param-scheduler), e.g. to extend a run."""


@dataclass
class TrainConfig(_Section):
    group_path: ClassVar[str] = "train"

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    """Sequences per optimizer step; gradient accumulation fills the gap."""
    seed: int = 1234
    precision: Precision = Precision.auto
    eval_interval: int = 50
    """0 disables validation."""
    eval_iters: int = 4
    """Global batches per validation."""
    log_interval: int = 1
    max_skipped_steps: int = 3
    """A step with a non-finite loss or gradient makes no update (training/guard.py); after
    more than this many such steps in a row the run stops with an error.  0: stop at the first."""
    spike_zscore: float = 6.0
    """Log a loss more than this many standard deviations above the mean of the last
    ``spike_window`` steps (OLMo-core's rule; logged only).  0 disables."""
    spike_window: int = 100
    """Steps in the rolling window of ``spike_zscore``."""


@dataclass
class CheckpointConfig(_Section):
    group_path: ClassVar[str] = "checkpoint"

    dir: Optional[str] = None
    """None: <run_dir>/checkpoints."""
    save_interval: int = 0
    """0: only at the end and on SIGTERM/SIGUSR1/SIGINT."""
    save_at_end: bool = True
    keep_last: Optional[int] = None
    """Keep only the newest N checkpoints (torchtitan's keep_latest_k); the one this run
    resumed from is kept too.  None: keep all."""
    resume: bool = True
    """Continue from the latest checkpoint in dir when one exists."""
    load: Optional[str] = None
    """Checkpoint to start from when dir holds none yet (torchtitan's initial_load_path): a
    requeued or restarted run continues from its own latest save, never back from here."""
    async_save: bool = False
    """Write checkpoints in a background process while training goes on (Megatron-LM's
    --async-save): the save costs the training loop a copy of the state (a fork on CPU), and
    the commit (checksums, rename, latest.txt) happens at the first step after the writes end.
    A run waits for its save in flight before the next save and before it exits."""
    save_timeout_s: float = 1200.0
    """A checkpoint writer process still writing after this long fails the save (one line,
    exit code 4) instead of hanging; a writer that dies (e.g. OOM-killed) fails it at once."""


@dataclass
class LoggingConfig(_Section):
    group_path: ClassVar[str] = "logging"

    wandb: bool = True
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "plt_train"
    peak_tflops: Optional[float] = None
    """The MFU denominator; None: the datasheet for known GPUs, else measured."""


@dataclass
class SampleConfig(_Section):
    """A short continuation generated at the end of training (nanochat-style), on every rank
    in lockstep (so expert-parallel MoE layers can dispatch); looped models with TP = PP = 1.
    Nucleus sampling by default: greedy decoding of a small model repeats itself."""

    group_path: ClassVar[str] = "sample"

    prompt: Optional[str] = None
    """None: no sample."""
    max_new_tokens: int = 48
    temperature: float = 0.8
    """0: greedy."""
    top_p: float = 0.9
    seed: int = 0
    """The same seed draws the same sample."""


@dataclass
class DownstreamConfig(_Section):
    """lm-evaluation-harness tasks run on the live model during training (OLMo-core's
    downstream evaluator): every ``interval`` steps and at the last step, logged as
    ``downstream/<task>/<metric>``.  TP = PP = 1 (other layouts: ``plt-eval`` on a
    checkpoint).  ``plt_train/evaluation/downstream.py``."""

    group_path: ClassVar[str] = "downstream"

    tasks: list[str] = field(default_factory=list)
    """Shipped (plt_tiny_mc, plt_tiny_gen) or lm-evaluation-harness task names; empty: off."""
    interval: int = 0
    """Steps between evaluations; 0: off."""
    limit: Optional[int] = None
    """Documents per task (the first ones); None: all."""
    num_fewshot: Optional[int] = None
    """None: each task's own default."""
    batch_size: int = 8
    """Sequences per forward."""


@dataclass
class RunConfig(_Section):
    name: str = "default"
    run_dir: Optional[str] = None
    """None: Hydra's run directory (shared by all ranks)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
