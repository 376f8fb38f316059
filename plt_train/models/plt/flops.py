"""Model FLOPs of the looped decoders (the MFU numerator) and their parameters per layer,
built on the GPT count.

Same convention as ``models/gpt/flops.py`` (every matmul, 2*m*n*k; causal attention counted
by the S(S+1)/2 pairs it keeps).  A looped model runs every layer component R times and the
LM head once.  PLT's loops r >= 2 compute full Q/K/V and MLPs too, but their attention is
loop 1's causal K/V (S(S+1)/2 pairs) plus, with G-SWA on, a window of w keys per query
(sum_i min(i+1, w) pairs, not S(S+1)/2), plus the gate's matmul.  Without shared K/V every
loop attends to its own K/V: R times the attention, as in a looped model.
"""
from __future__ import annotations

from plt_train.config.schema import GateInput, ModelConfig, ModelName
from plt_train.models.gpt.flops import (
    FlopCount, decoder_layer_parameters, flops_per_sequence_from_config,
)
from plt_train.models.plt.gate import gate_parameters

_ATTENTION = ("attn_scores", "attn_values")


def window_pairs(seq_length: int, window: int) -> int:
    """Query-key pairs of causal window attention: query i sees min(i+1, window) keys."""
    S, w = seq_length, window
    return S * (S + 1) // 2 if S <= w else w * (w + 1) // 2 + (S - w) * w


def looped_flops_per_sequence(model: ModelConfig, vocab_size: int) -> FlopCount:
    base = flops_per_sequence_from_config(model, vocab_size)
    R = 1 if model.name == ModelName.vanilla else model.loops
    c = dict(base.components)
    for name in c:
        if name == "lm_head":
            continue
        if name in _ATTENTION and model.uses_gswa:
            S = model.seq_length
            local = window_pairs(S, model.loop.window) / (S * (S + 1) / 2)
            c[name] = int(c[name] * (R + (R - 1) * local))
        else:
            c[name] *= R
    if model.uses_gswa:
        a, d = model.num_attention_heads, model.head_dim
        per_token = 2 * a * d if model.loop.gate == GateInput.query else 2 * model.hidden_size * a
        c["gswa_gate"] = (R - 1) * model.num_layers * model.seq_length * per_token
    forward = sum(c.values())
    return FlopCount(forward=forward, training=3 * forward, components=c)


def looped_layer_parameters(model: ModelConfig, tp: int = 1, ep: int = 1) -> int:
    """One rank's parameters of a layer of the shared block: the GPT layer's, plus G-SWA's
    gate (split by heads over TP).  Counted once however many loops run."""
    return decoder_layer_parameters(model, tp, ep) + gate_parameters(model) // tp
