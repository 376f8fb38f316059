"""MoE arithmetic: model FLOPs of our layers (the MFU numerator) and the paper's Table 3.

Same convention as ``models/gpt/flops.py``: ``2*m*n*k`` per matmul, nothing else.  Per token
and layer, forward, with h = hidden, w = r*h the expert width, k = top_k, E = experts, m = 3
matrices per expert for SwiGLU (gate, up, down) or 2 for ReLU:

    router          2 * h * E
    routed experts  k * m * 2 * h * w        ACTIVE experts only (the k a token is routed to),
                                             the same for fine_grained (h -> w -> h) and
                                             bigmac (w -> h -> w) experts
    bigmac          + 2 * h * w (descend) + 2 * w * h (ascend)
    shared experts  3 * 2 * h * (n_shared * w)   (SwiGLU, always on)

Tokens dropped by the capacity factor are still counted (model FLOPs, like Megatron-LM's
MoE accounting): MFU then reports the work the model is defined to do.

``paper_table3`` is the paper's (arXiv 2502.16927, Table 3) closed form for parameters, FLOPs
and all-to-all volume, used for the 32-GPU projection in ``scripts/bench_moe.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from plt_train.config.schema import ExpertActivation, MLPLayer, ModelConfig


def expert_matrices(activation: str) -> int:
    return 3 if activation == ExpertActivation.swiglu else 2


def moe_mlp_flops_per_token(model: ModelConfig) -> int:
    """Forward matmul FLOPs of one MoE layer for one token (module docstring)."""
    moe, h, w = model.moe, model.hidden_size, model.expert_width
    flops = 2 * h * moe.num_experts  # router
    flops += moe.top_k * expert_matrices(moe.activation) * 2 * h * w
    if moe.layer == MLPLayer.bigmac:
        flops += 2 * (2 * h * w)
    flops += 3 * 2 * h * moe.num_shared_experts * w
    return flops


def moe_layer_parameters(model: ModelConfig) -> dict:
    """Parameters of one MoE layer (no norms): total and active per token."""
    moe, h, w = model.moe, model.hidden_size, model.expert_width
    per_expert = expert_matrices(moe.activation) * h * w
    router = moe.num_experts * h
    proj = 2 * h * w if moe.layer == MLPLayer.bigmac else 0
    shared = 3 * h * moe.num_shared_experts * w
    return {"total": router + moe.num_experts * per_expert + proj + shared,
            "active": router + moe.top_k * per_expert + proj + shared,
            "per_expert": per_expert, "projections": proj, "shared": shared}


@dataclass(frozen=True)
class Table3:
    params: float
    flops: float  # per iteration, training (forward + backward)
    a2a_elements: float  # per iteration, all ranks, dispatch + combine, forward + backward


def paper_table3(layer: str, b: int, s: int, l: int, h: int, v: int, e: int, top_k: int,
                 r: float, ep: int) -> Table3:
    """The paper's Table 3 formulas (GPT-3 style layers with biases, ReLU-like experts).

    * params, fine-grained: ``(4h^2 + 8h + (2rh^2 + 2rh) e) l + (v + e + 2) h``; BigMac adds
      ``2 r l h^2``.
    * FLOPs, fine-grained: ``12 b s l h^2 (2 + s/h + v/(2lh) + r*top_k)``; BigMac adds
      ``12 r b s l h^2``.
    * all-to-all, per MoE layer and pass: ``C = 2 top_k (ep-1)/ep b s h`` elements (dispatch
      + combine); BigMac: h -> r*h.  The paper's per-iteration figure (e.g. GPT3-XL, top-8,
      ep=32, bf16, 0.5M tokens: 1488 GiB fine-grained, 372 GiB BigMac) is that times l layers
      times 2 (the backward pass repeats both all-to-alls).
    """
    params = (4 * h * h + 8 * h + (2 * r * h * h + 2 * r * h) * e) * l + (v + e + 2) * h
    flops = 12 * b * s * l * h * h * (2 + s / h + v / (2 * l * h) + r * top_k)
    width = h
    if layer == "bigmac":
        params += 2 * r * l * h * h
        flops += 12 * r * b * s * l * h * h
        width = r * h
    elif layer != "fine_grained":
        raise ValueError(f"Table 3 covers fine_grained and bigmac, not {layer!r}")
    a2a = 2 * (2 * top_k * (ep - 1) / ep * b * s * width) * l
    return Table3(params=params, flops=flops, a2a_elements=a2a)
