"""Model FLOPs of the looped decoders (the MFU numerator), built on the GPT count.

Same convention as ``models/gpt/flops.py`` (every matmul, 2*m*n*k; causal attention counted
by the S(S+1)/2 pairs it keeps).  A looped model runs every layer component R times and the
LM head once.  PLT's loops r >= 2 compute full Q/K/V and MLPs too, but their attention is
loop 1's causal K/V (S(S+1)/2 pairs) plus, with G-SWA on, a window of w keys per query
(sum_i min(i+1, w) pairs, not S(S+1)/2), plus the gate's matmul.
"""
from __future__ import annotations

from plt_train.config.schema import ModelConfig
from plt_train.models.gpt.flops import FlopCount, flops_per_sequence_from_config

_ATTENTION = ("attn_scores", "attn_values")


def window_pairs(seq_length: int, window: int) -> int:
    """Query-key pairs of causal window attention: query i sees min(i+1, window) keys."""
    S, w = seq_length, window
    return S * (S + 1) // 2 if S <= w else w * (w + 1) // 2 + (S - w) * w


def looped_flops_per_sequence(model: ModelConfig, vocab_size: int, kind: str) -> FlopCount:
    base = flops_per_sequence_from_config(model, vocab_size)
    R = 1 if kind == "vanilla" else model.loops
    c = dict(base.components)
    for name in c:
        if name == "lm_head":
            continue
        if name in _ATTENTION and kind == "plt" and R > 1 and model.loop.gswa:
            S = model.seq_length
            local = window_pairs(S, model.loop.window) / (S * (S + 1) / 2)
            c[name] = int(c[name] * (R + (R - 1) * local))
        else:
            c[name] *= R
    if kind == "plt" and R > 1 and model.loop.gswa:
        a, d = model.num_attention_heads, model.hidden_size // model.num_attention_heads
        per_token = 2 * a * d if model.loop.gate == "query" else 2 * model.hidden_size * a
        c["gswa_gate"] = (R - 1) * model.num_layers * model.seq_length * per_token
    forward = sum(c.values())
    return FlopCount(forward=forward, training=3 * forward, components=c)
