"""Typed run configuration: the single source of truth for every knob.

Each group mirrors a Hydra config group under ``configs/`` (model, parallel, data, optim,
train, checkpoint, logging).  YAML files only override these defaults; an unknown key is a
Hydra error because the schema below is registered in the ConfigStore (see ``store.py``).

Choices where the issues were silent follow Megatron-LM conventions: ``global_batch_size``
is in sequences, learning-rate steps are optimizer steps, ``ffn_hidden_size`` defaults to the
Llama rule (8/3 * hidden, rounded up to a multiple of 64) for SwiGLU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LoopConfig:
    """Looped decoders (``model.name`` looped or plt): one shared block run ``model.loops`` times.

    Defaults follow the released PLT recipe (PAPERS.md section 1): window 64, loop 1's K/V
    detached for later loops, non-final loop outputs through the shared final norm.
    """

    window: int = 64  # G-SWA: each later loop attends to its own last ``window`` tokens
    gate: str = "query"  # per-head G-SWA gate from the post-RoPE query ("query") or "input"
    gswa: bool = True  # False: later loops attend to loop 1's K/V only
    detach_kv: bool = True  # later loops see loop 1's K/V as constants (no gradient into it)
    emb_scale: float = 1.0  # loop r >= 2 input: emb_scale * Embed(x) + hidden_scale * shift(h)
    hidden_scale: float = 1.0
    norm_between_loops: bool = True  # feed the shared final norm of non-final loop outputs
    # Attention kernels of the later loops (fused G-SWA in training and prefill, one launch per
    # layer in decode): "auto" (Triton on CUDA once the kernel passed its first-use check
    # against the pure-torch reference there, else the reference), "triton" (required; on CPU
    # only under TRITON_INTERPRET=1, for tests) or "torch".  kernels/__init__.py.
    kernel: str = "auto"


@dataclass
class MoEConfig:
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

    layer: str = "dense"  # dense | fine_grained | bigmac
    num_experts: int = 64
    top_k: int = 8
    ratio: float = 0.25  # r: each expert's width is r * hidden_size (must be a whole number)
    # SwiGLU follows the rest of the model (3 matrices of r*h x h per expert); "relu" is the
    # paper's ReLU-like MLP (2 matrices).  Both layer types use the same expert activation.
    activation: str = "swiglu"  # swiglu | relu
    # DeepSeekMoE shared experts: always-on SwiGLU MLP of width num_shared_experts * r * h on
    # the full-width hidden state, added to the routed output (also allowed for bigmac).
    num_shared_experts: int = 0
    aux_loss_coeff: float = 1e-3  # Switch load-balancing loss (megatron's "aux_loss"); 0 = off
    z_loss_coeff: Optional[float] = None  # router z-loss (ST-MoE); None = off
    # Expert capacity = ceil(tokens * top_k / num_experts * factor) per rank's tokens, as in
    # megatron-core; over-capacity assignments with the lowest router probability are dropped.
    # None = dropless (every assignment is computed).
    capacity_factor: Optional[float] = 1.2
    router_score_function: str = "softmax"  # softmax | sigmoid (megatron's TopKRouter)
    router_pre_softmax: bool = False  # softmax over all experts before top-k (else after)
    # Expert GEMMs: "auto" (Transformer Engine's grouped GEMM when installed and the TE
    # backend is active, else torch._grouped_mm where it runs, else the loop), "grouped"
    # (torch._grouped_mm), "loop" (one matmul per expert: the reference), "te".
    expert_gemm: str = "auto"
    # The fused (un)permutation kernels of kernels/dcca.py: for bigmac the DCCA dispatch /
    # combine (descend + permute, gather-sum + ascend), for fine_grained the gate-weighted
    # gather-sum combine in place of megatron's unpermute.  "auto" (Triton on CUDA once it
    # passed its first-use check, else torch), "triton" (required) or "torch".
    dcca_kernel: str = "auto"
    # Number format of the expert-parallel all-to-all (plt_train/models/moe/wire.py): "native"
    # (the activations' dtype), "bf16" (all four all-to-alls), "fp8" (DeepSeek-V3: dispatch
    # forward in float8 e4m3 with a power-of-two scale per 1x128 tile, the rest bf16).
    wire_format: str = "native"


@dataclass
class ModelConfig:
    """A GPT-style decoder: RMSNorm, RoPE, SwiGLU, no biases."""

    # Key in plt_train.models.MODEL_REGISTRY: gpt (megatron GPTModel), vanilla (our decoder,
    # one loop), looped (R loops, each feeding the next at the same position), plt (Parallel
    # Loop Transformer: shift-by-one cross-loop input, shared KV + gated sliding window).
    name: str = "gpt"
    loops: int = 1  # R: passes through the shared block (looped and plt)
    loop: LoopConfig = field(default_factory=LoopConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; None = one group per head
    ffn_hidden_size: Optional[int] = None  # None: 8/3 * hidden_size rounded up to 64
    seq_length: int = 256
    # Embedding rows before padding: None takes the tokenizer's vocabulary; a larger value
    # leaves room for tokens added later (config/megatron.py:padded_vocab_size).
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128  # Megatron-LM's padding rule (times TP size)
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    # Spec provider: "local" (pure torch + megatron-core, SDPA attention), "te" (Transformer
    # Engine), or "auto" (TE when it imports and CUDA is present, else local).
    backend: str = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # SwiGLU as one fused kernel forward and one backward (megatron-core's
    # ``bias_swiglu_impl``, i.e. TransformerConfig.bias_activation_fusion: torch.compile'd),
    # in the dense MLPs and the routed experts, instead of eager chunk / silu / mul and their
    # autograd.  "auto": on with CUDA (Megatron-LM's default, --bias-swiglu-fusion), off on
    # CPU, where torch.compile builds C++ for every new shape; "on"; "off".
    swiglu_fusion: str = "auto"


@dataclass
class ParallelConfig:
    """Megatron-core parallel sizes. Data parallel is derived: world / (tp * pp * cp)."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    data: Optional[int] = None  # optional check: if set, must equal the derived size


@dataclass
class DataConfig:
    """Where tokens come from.

    ``prefix`` None selects the embedded corpus: the running interpreter's standard-library
    sources, tokenized with a byte-level BPE trained on them, built once into ``cache_dir``.
    """

    prefix: Optional[str] = None  # megatron indexed dataset prefix (<prefix>.bin / .idx)
    tokenizer: Optional[str] = None  # a HuggingFace tokenizer.json; None with prefix None: trained
    vocab_size: int = 8192  # BPE vocabulary trained for the embedded corpus
    split: str = "98,2,0"  # train, valid, test weights (Megatron-LM convention)
    cache_dir: str = "~/.cache/plt_train"  # PLT_TRAIN_CACHE overrides
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW through megatron-core's optimizer; warmup + cosine decay."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    warmup_steps: int = 20
    decay_style: str = "cosine"  # cosine | linear | constant (megatron OptimizerParamScheduler)
    decay_steps: Optional[int] = None  # None: train.steps
    # On resume megatron takes the lr schedule (lr, min_lr, warmup, decay steps and style)
    # from the checkpoint, and we print what differs from the config. True makes the config's
    # win instead (Megatron-LM's --override-opt_param-scheduler), e.g. to extend a run.
    override_schedule_on_resume: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8  # sequences per optimizer step; accumulation fills the gap
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    eval_interval: int = 50  # 0 disables validation
    eval_iters: int = 4  # global batches per validation
    log_interval: int = 1


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    save_interval: int = 0  # 0: only at the end and on SIGTERM/SIGUSR1
    save_at_end: bool = True
    resume: bool = True  # continue from the latest checkpoint in dir when one exists
    # Checkpoint to start from when dir holds none yet (torchtitan's initial_load_path): a
    # requeued or restarted run continues from its own latest save, never back from here.
    load: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "plt_train"
    peak_tflops: Optional[float] = None  # None: datasheet for known GPUs, measured on CPU


@dataclass
class SampleConfig:
    """A short continuation generated at the end of training (nanochat-style), on every rank
    in lockstep (so expert-parallel MoE layers can dispatch); looped models with TP = PP = 1."""

    prompt: Optional[str] = None  # None: no sample
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "default"
    run_dir: Optional[str] = None  # None: Hydra's run directory (shared by all ranks)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
