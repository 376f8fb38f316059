"""Model FLOPs of our GPT decoder (the numerator of MFU) and its parameters per layer (the
dry run's plan).

Convention (PaLM appendix B, Megatron-LM "Efficient Large-Scale Language Model Training"):
count ``2*m*n*k`` for every matrix multiply of an (m x k) by a (k x n) operand and nothing
else.  Norms (RMSNorm), RoPE, softmax, SwiGLU's elementwise gate, residual adds, dropout and
the embedding lookup are NOT counted: they are a few percent of the work and are memory-bound,
so counting them would only flatter the utilisation figure.

Per sequence of S tokens, with h = hidden_size, a = num_attention_heads, g = num_query_groups,
d = kv_channels (default h / a), f = ffn_hidden_size, V = vocab_size, L = num_layers:

    qkv_proj      = 2 * S * h * (a + 2g) * d
    attn_scores   = 2 * a * d * S(S+1)/2        (Q K^T)
    attn_values   = 2 * a * d * S(S+1)/2        (softmax(.) V)
    out_proj      = 2 * S * (a*d) * h
    mlp           = 3 * 2 * S * h * f           (SwiGLU: gate, up, down; no biases)
    forward       = L * (sum of the above) + lm_head,   lm_head = 2 * S * h * V
    training      = 3 * forward                 (backward = 2x forward: grads of inputs and weights)

The attention terms count the query-key pairs the CAUSAL mask keeps, S(S+1)/2, not S^2: a
flash/fused kernel skips the masked half, so counting S^2 would let MFU exceed what the
hardware can do.  A tied LM head does the same matmul as an untied one, so tying does not
change the count.  Activation recomputation is not counted either: this is model FLOPs (MFU),
not hardware FLOPs (HFU), so turning recomputation on costs MFU, as it should.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from plt_train.config.schema import MLPLayer, ModelConfig

# Components that are computed once per layer (the rest, lm_head, once per model).
_LAYER_COMPONENTS = ("qkv_proj", "attn_scores", "attn_values", "out_proj", "mlp")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one sequence. ``components`` holds forward FLOPs summed over all layers."""

    forward: int
    training: int
    components: Dict[str, int] = field(default_factory=dict)


def gpt_flops_per_sequence(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: Optional[int],
    ffn_hidden_size: int,
    seq_length: int,
    vocab_size: int,
    kv_channels: Optional[int] = None,
) -> FlopCount:
    """Matmul FLOPs of one ``seq_length``-token sequence (formula in the module docstring).

    ``num_query_groups`` None means one group per head (plain multi-head attention).
    """
    h, a, S, f, V = hidden_size, num_attention_heads, seq_length, ffn_hidden_size, vocab_size
    g = a if num_query_groups is None else num_query_groups
    d = h // a if kv_channels is None else kv_channels
    if h % a and kv_channels is None:
        raise ValueError(f"hidden_size {h} not divisible by num_attention_heads {a}")
    if a % g:
        raise ValueError(f"num_attention_heads {a} not divisible by num_query_groups {g}")
    causal_pairs = S * (S + 1) // 2  # query-key pairs left by the causal mask
    per_layer = {
        "qkv_proj": 2 * S * h * (a + 2 * g) * d,
        "attn_scores": 2 * a * d * causal_pairs,
        "attn_values": 2 * a * d * causal_pairs,
        "out_proj": 2 * S * a * d * h,
        "mlp": 3 * 2 * S * h * f,
    }
    components = {name: num_layers * per_layer[name] for name in _LAYER_COMPONENTS}
    components["lm_head"] = 2 * S * h * V
    forward = sum(components.values())
    return FlopCount(forward=forward, training=3 * forward, components=components)


def flops_per_sequence_from_config(model_cfg: ModelConfig, vocab_size: int) -> FlopCount:
    """``gpt_flops_per_sequence`` for a ``ModelConfig``.

    ``vocab_size`` is passed separately because the config's may be None until the tokenizer
    is known; pass the PADDED size, since the LM head really multiplies by all of it.  The FFN
    size comes from the same rule the model builder uses (``ModelConfig.ffn_size``); with
    ``model.moe.layer`` fine_grained or bigmac the ``mlp`` component is the MoE layer's
    (``models/moe/flops.py``: router + active experts + BigMac's projections).
    """
    count = gpt_flops_per_sequence(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_size,
        seq_length=model_cfg.seq_length,
        vocab_size=vocab_size,
    )
    if model_cfg.moe.layer == MLPLayer.dense:
        return count
    # MoE MLPs (model.moe): the router, the top-k ACTIVE experts and BigMac's descend/ascend
    # projections replace the dense MLP term (plt_train.models.moe.flops).
    from plt_train.models.moe.flops import moe_mlp_flops_per_token

    components = dict(count.components)
    components["mlp"] = (model_cfg.num_layers * model_cfg.seq_length
                         * moe_mlp_flops_per_token(model_cfg))
    forward = sum(components.values())
    return FlopCount(forward=forward, training=3 * forward, components=components)


def decoder_layer_parameters(model: ModelConfig, tp: int = 1, ep: int = 1) -> int:
    """Parameters of one decoder layer held by one rank of a TP x EP layout (1, 1: all).

    Attention, dense MLPs and shared experts are split by TP; the two norms, the router and
    BigMac's projections are replicated; each expert-parallel rank holds ``num_experts / EP``
    whole experts (expert TP is 1).
    """
    from plt_train.models.moe.flops import moe_layer_parameters

    h, heads, d, groups = model.hidden_size, model.num_attention_heads, model.head_dim, \
        model.query_groups
    split = h * d * (heads + 2 * groups) + heads * d * h  # QKV and output projections
    whole = 2 * h  # the two norms
    if model.moe.layer == MLPLayer.dense:
        return (split + 3 * h * model.ffn_size) // tp + whole
    moe = moe_layer_parameters(model)
    experts = model.moe.num_experts * moe["per_expert"]
    whole += moe["total"] - experts - moe["shared"]  # router, BigMac's descend and ascend
    return (split + moe["shared"]) // tp + whole + experts // ep
