"""The FLOP formula against an independent count: FlopCounterMode on a plain-PyTorch decoder."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from plt_train.config.schema import ModelConfig
from plt_train.models.gpt.flops import flops_per_sequence_from_config, gpt_flops_per_sequence


class RMSNorm(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class AttnCore(nn.Module):
    """softmax(QK^T) V over the FULL S x S grid, masked afterwards (what FlopCounter sees)."""

    def forward(self, q, k, v):
        s = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Layer(nn.Module):
    def __init__(self, h, a, g, d, f):
        super().__init__()
        self.a, self.g, self.d = a, g, d
        self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
        self.q = nn.Linear(h, a * d, bias=False)
        self.k = nn.Linear(h, g * d, bias=False)
        self.v = nn.Linear(h, g * d, bias=False)
        self.o = nn.Linear(a * d, h, bias=False)
        self.attn_core = AttnCore()
        self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.norm1(x)
        q = self.q(y).view(b, s, self.a, self.d).transpose(1, 2)
        k = self.k(y).view(b, s, self.g, self.d).transpose(1, 2)
        v = self.v(y).view(b, s, self.g, self.d).transpose(1, 2)
        rep = self.a // self.g  # GQA: each key/value group serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        x = x + self.o(self.attn_core(q, k, v).transpose(1, 2).reshape(b, s, -1))
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class TinyDecoder(nn.Module):
    def __init__(self, L, h, a, g, d, f, V):
        super().__init__()
        self.embed = nn.Embedding(V, h)
        self.layers = nn.ModuleList(Layer(h, a, g, d, f) for _ in range(L))
        self.norm = RMSNorm(h)
        self.lm_head = nn.Linear(h, V, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def count(L, h, a, g, d, f, S, V):
    """(total forward FLOPs, FLOPs inside the attention cores) of one sequence."""
    model = TinyDecoder(L, h, a, g, d, f, V)
    with FlopCounterMode(display=False) as counter:
        logits = model(torch.randint(0, V, (1, S)))
    assert logits.shape == (1, S, V)
    per_module = counter.get_flop_counts()
    attn = sum(sum(ops.values()) for name, ops in per_module.items() if name.endswith("attn_core"))
    return counter.get_total_flops(), attn


@pytest.mark.parametrize(
    "L,h,a,g,kv,f,S,V",
    [
        (2, 64, 4, 2, None, 96, 16, 100),  # GQA, kv_channels = h / a
        (1, 48, 6, None, 24, 64, 9, 37),  # MHA, kv_channels != h / a, odd S
        (3, 32, 4, 1, None, 80, 32, 64),  # multi-query attention
    ],
)
def test_formula_matches_flop_counter(L, h, a, g, kv, f, S, V):
    d = kv or h // a
    total, attn_full = count(L, h, a, g or a, d, f, S, V)
    fc = gpt_flops_per_sequence(L, h, a, g, f, S, V, kv_channels=kv)
    attn = fc.components["attn_scores"] + fc.components["attn_values"]
    assert fc.forward - attn == total - attn_full  # every projection, MLP and LM head exactly
    assert attn * 2 * S == attn_full * (S + 1)  # causal pairs: full S^2 count * (S+1)/(2S)
    assert attn < attn_full
    assert fc.training == 3 * fc.forward
    assert fc.forward == sum(fc.components.values())


def test_hand_count():
    # L=1, h=4, a=g=1, f=8, S=2, V=10: qkv 192, scores 24, values 24, out 64, mlp 384, head 160.
    fc = gpt_flops_per_sequence(1, 4, 1, 1, 8, 2, 10)
    assert fc.components == {"qkv_proj": 192, "attn_scores": 24, "attn_values": 24,
                             "out_proj": 64, "mlp": 384, "lm_head": 160}
    assert (fc.forward, fc.training) == (848, 2544)


def test_from_config_uses_default_ffn_and_gqa():
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                      seq_length=128)
    got = flops_per_sequence_from_config(cfg, vocab_size=8192)  # ffn: 8/3 * 256 = 682.7 -> 704
    assert got == gpt_flops_per_sequence(2, 256, 4, 2, 704, 128, 8192)
    mha = flops_per_sequence_from_config(ModelConfig(num_layers=2, hidden_size=256, seq_length=128), 8192)
    assert mha.components["qkv_proj"] > got.components["qkv_proj"]  # GQA shrinks K and V only
    assert mha.components["mlp"] == got.components["mlp"]


def test_rejects_bad_grouping():
    with pytest.raises(ValueError):
        gpt_flops_per_sequence(1, 64, 4, 3, 128, 8, 10)
