"""A plain-PyTorch GPT decoder: the baseline a user would write instead of using plt_train.

Same shape, parameters and matmul FLOPs as our megatron-core GPT (``plt_train.models.gpt``):
pre-norm RMSNorm (``F.rms_norm``), RoPE (rotate-half, base 10000), one fused QKV linear,
``F.scaled_dot_product_attention(is_causal=True)``, SwiGLU MLP (gate, up, down), no biases,
untied embedding and LM head, cross-entropy in fp32.  Layout [batch, seq, hidden].

Initialisation follows ``plt_train.models.init``: normal(0, std), std / sqrt(2 * layers) for
the output projection of each residual branch, ones for norm weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    """cos/sin tables [seq, head_dim] in fp32 (megatron's non-interleaved layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; rotate-half RoPE computed in x's dtype, as megatron's unfused path."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        y = F.rms_norm(x, (h,), self.attn_norm, self.eps)
        q, k, v = self.qkv(y).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        y = F.rms_norm(x, (h,), self.mlp_norm, self.eps)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class PlainGPT(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int,
                 num_attention_heads: int, ffn_hidden_size: int, seq_length: int,
                 norm_epsilon: float = 1e-5, rotary_base: float = 10000.0,
                 init_method_std: float = 0.02):
        super().__init__()
        self.eps = norm_epsilon
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            Block(hidden_size, num_attention_heads, ffn_hidden_size, norm_epsilon)
            for _ in range(num_layers))
        self.final_norm = nn.Parameter(torch.ones(hidden_size))
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        cos, sin = rope_tables(seq_length, hidden_size // num_attention_heads, rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters(init_method_std, num_layers)

    @torch.no_grad()
    def reset_parameters(self, std: float, num_layers: int) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("proj.weight", "down.weight")):
                p.normal_(0.0, std / math.sqrt(2 * num_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None):
        """tokens/labels [b, s] int64 -> mean token loss (fp32), or logits without labels."""
        s = tokens.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_parameters(vocab_size: int, hidden_size: int, num_layers: int,
                        ffn_hidden_size: int) -> int:
    """Parameters of our megatron GPT (MHA, untied): embedding + LM head, per layer two norms,
    QKV (3h x h), out proj (h x h), fc1 (2f x h: gate and up), fc2 (h x f); final norm."""
    h, f, V = hidden_size, ffn_hidden_size, vocab_size
    per_layer = 2 * h + 3 * h * h + h * h + 3 * h * f
    return 2 * V * h + num_layers * per_layer + h
