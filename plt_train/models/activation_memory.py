"""The activation memory one micro-batch leaves for the backward pass, estimated from the
config: ``plt-dryrun``'s figure, checked against a measurement by ``scripts/bench_memory.py``
(autograd's saved-tensor hooks, ``models/memory.py``; docs/benchmarks.md).

Counted tensor by tensor, as our layers keep them (each storage once; found by listing what
the hooks see, layer by layer).  Units: ``E = s*b*h`` elements, ``F = s*b*ffn``, ``T = s*b``
tokens, ``t`` the TP size, ``n``/``g`` attention heads / query groups, ``d`` the head size;
``E_sp = E/t`` under sequence parallelism (norms and residuals hold a slice of the
sequence), else ``E``.  Two things depend on the device (``Device``): CUDA's fused RMSNorm
keeps its input and 1/rms, the CPU composite also the normalised input; the fused SwiGLU
(``model.swiglu_fusion``, auto: on with CUDA) keeps its input and the second linear's, the
unfused one also SiLU's output and a copy of the linear half (megatron's ``glu`` adds its
offset).

* **Attention** (every loop of gpt / vanilla / looped, loop 1 of PLT): the input norm
  (``norm``: its input, the normalised input on CPU, the output the QKV projection keeps),
  the fused QKV projection's output (V is a view of it: (n + 2g)/n E/t), RoPE'd Q and K
  ((n + g)/n E/t) and their cos/sin tables (4 s d), the attention output the output
  projection keeps (E/t) with its fp32 log-sum-exp (T n/t); no [s, s] scores (SDPA's fused
  kernels, PLT's fused G-SWA).
* **PLT's later loops (G-SWA)** add the global branch's output and the kernel's ``diff``
  (2 E/t), a second log-sum-exp and the gate (T n/t each); loop 1's K/V are the same
  storage, not kept again.
* **Dense MLP**: ``norm``, the first linear's output (2F/t), SiLU's output and the linear
  half's copy (2F/t, unfused only), the product the second linear keeps (F/t).
* **MoE layer**: ``norm``, the router's fp32 scores and integer routing state (about
  3 T x experts + 6 k T), then per routed row (top-k per token; width ``w`` = h for
  fine-grained, r h for BigMac; expert hidden ``e`` = r h resp. h): the dispatched input (w),
  the expert's SwiGLU (2e + e + e unfused, 2e + e fused: no offset copy; ReLU e), the expert output
  the gate-weighted combine keeps (w); BigMac also the combined latent its ascend projection
  keeps (T r h).  Each TP rank routes its slice of the tokens.
* **Loops**: every loop keeps its own copy of the above; where a non-final loop's output
  goes on through the final norm (``ModelConfig.normed_loop_feed``), that norm keeps its
  input, and the normalised input on CPU.
* **Head**: the final norm, and the vocabulary-parallel cross entropy's fp32 softmax
  (T V/t).

Recompute (``model.recompute``): **full** keeps each recomputed layer's input per loop
(E_sp) and, for PLT, loop 1's K and V, which the later loops' checkpoints hold (2g/n E/t;
``recompute.py`` copies V out of the QKV output); the layers it does not cover keep
everything.  **selective**: ``core_attn`` drops the log-sum-exp (the checkpoint keeps Q, K,
V and the output projection the attention output), for G-SWA also its global output and
``diff``; ``layernorm`` drops the norms' outputs and normalised inputs (megatron empties
them after the forward pass); ``mlp`` / ``moe`` drop everything inside the MLP / MoE layer but
its input.  The layer being recomputed in the backward pass is transient and not counted.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from plt_train.config.schema import (
    ExpertActivation, MLPLayer, ModelConfig, ModelName, ParallelConfig, Recompute, Switch,
)


class Device(enum.StrEnum):
    cuda = "cuda"
    cpu = "cpu"


@dataclass(frozen=True)
class _Shape:
    """The sizes every term needs, for one micro-batch on one rank."""

    m: ModelConfig
    tokens: int
    t: int
    sp: bool
    fused_norm: bool
    fused_swiglu: bool

    @property
    def E(self) -> float:  # noqa: N802 - the docstring's name
        return self.tokens * self.m.hidden_size

    @property
    def e_sp(self) -> float:
        return self.E / self.t if self.sp else self.E

    def norm(self, recomputed: bool) -> float:
        """A norm feeding a linear: its input, the normalised input (CPU), its output."""
        if recomputed:
            return self.e_sp
        return self.e_sp * (2 if self.fused_norm else 3)

    def swiglu(self, rows: float, width: int) -> float:
        """First linear's output, SiLU and the linear half (unfused), the product."""
        return rows * width * (3 if self.fused_swiglu else 5)


def _attention(x: _Shape, later_loop: bool, modules: set) -> tuple[float, float]:
    """(elements, fp32 elements) of one attention block."""
    m, E, t = x.m, x.E, x.t
    groups = m.query_groups / m.num_attention_heads
    lse = x.tokens * m.num_attention_heads / t
    kept = (x.norm("layernorm" in modules)
            + (1 + 2 * groups) * E / t  # fused QKV output (V's view keeps it)
            + (1 + groups) * E / t  # RoPE'd Q and K
            + 4 * m.seq_length * m.head_dim  # RoPE cos / sin for Q and K
            + E / t)  # the attention output (the output projection's input)
    fp32 = x.tokens  # the norm's 1/rms
    if later_loop:
        fp32 += lse  # the gate
        if "core_attn" not in modules:
            kept += 2 * E / t  # the global branch's output, the kernel's diff
            fp32 += 2 * lse
    elif "core_attn" not in modules:
        fp32 += lse
    return kept, fp32


def _mlp(x: _Shape, modules: set) -> tuple[float, float]:
    m, t = x.m, x.t
    if m.moe.layer == MLPLayer.dense:
        if "mlp" in modules:  # the checkpoint's input is the norm's output, counted there
            return x.norm("layernorm" in modules), x.tokens
        return x.norm("layernorm" in modules) + x.swiglu(x.tokens, m.ffn_size / t), x.tokens
    if "moe" in modules:
        return x.norm("layernorm" in modules), x.tokens
    moe, h, r_h = m.moe, m.hidden_size, m.expert_width
    local = x.tokens / t if x.sp else x.tokens  # each TP rank routes its slice
    rows = local * moe.top_k
    w, e = (r_h, h) if moe.layer == MLPLayer.bigmac else (h, r_h)
    if moe.activation == ExpertActivation.swiglu:  # our experts' SwiGLU has no offset copy
        experts = rows * e * (3 if x.fused_swiglu else 4)
    else:  # ReLU keeps its output, which the second linear keeps too
        experts = rows * e
    kept = x.norm("layernorm" in modules) + rows * 2 * w + experts
    if moe.layer == MLPLayer.bigmac:
        kept += local * r_h
    return kept, x.tokens + 3 * local * moe.num_experts + 6 * rows


def activation_bytes(m: ModelConfig, p: ParallelConfig, micro_batch: int, layers: int,
                     vocab: int, head: bool, bytes_per_element: int,
                     device: Device = Device.cuda) -> float:
    """Bytes one micro-batch keeps for the backward pass on a stage of ``layers`` layers
    (``head``: the stage holds the final norm and the loss) of a run on ``device``."""
    fused_swiglu = (m.swiglu_fusion == Switch.on
                    or (m.swiglu_fusion == Switch.auto and device == Device.cuda))
    x = _Shape(m=m, tokens=(m.seq_length // p.context) * micro_batch, t=p.tensor,
               sp=p.sequence_parallel, fused_norm=device == Device.cuda,
               fused_swiglu=fused_swiglu)
    loops = m.loops if m.name in (ModelName.looped, ModelName.plt) else 1
    rc = m.recompute
    modules = set(rc.modules) if rc.granularity == Recompute.selective else set()
    full = 0
    if rc.granularity == Recompute.full:
        full = layers if rc.num_layers is None else min(rc.num_layers, layers)
    shared_kv = 2 * x.E * m.query_groups / m.num_attention_heads / x.t

    kept, fp32 = 0.0, 0.0
    for loop in range(loops):
        a, a32 = _attention(x, m.shares_kv and loop > 0, modules)
        f, f32 = _mlp(x, modules)
        kept += (layers - full) * (a + f) + full * x.e_sp
        fp32 += (layers - full) * (a32 + f32)
        if m.shares_kv and loop == 0:
            kept += full * shared_kv
        if loop < loops - 1 and m.normed_loop_feed:
            kept += x.e_sp * (1 if x.fused_norm else 2)
            fp32 += x.tokens
    if head:
        kept += x.norm(False)
        fp32 += x.tokens * vocab / x.t + x.tokens
    return kept * bytes_per_element + fp32 * 4
