"""Model building blocks against megatron-core's own reference implementations."""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import ModelConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs


def _tconfig(dev, **model_kw):
    from plt_train.models.transformer_config import to_transformer_config
    m = ModelConfig(**{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                       "seq_length": 16, **model_kw})
    return m, to_transformer_config(m, ParallelConfig(), torch.float32, megatron_device_kwargs(dev))


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_sdpa_attention_matches_megatron_dot_product_attention(one_rank, groups):
    """Same numbers as megatron's unfused local attention (which materialises the scores)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from plt_train.models.common.sdpa_attention import SDPAttention

    _, tc = _tconfig(one_rank, num_query_groups=groups)
    ref = DotProductAttention(tc, 1, AttnMaskType.causal, "self")
    ours = SDPAttention(tc, 1, AttnMaskType.causal, "self")
    s, b, hn = 16, 3, 16
    g = torch.Generator().manual_seed(groups)
    q = torch.randn(s, b, 4, hn, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, hn, generator=g, requires_grad=True)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    out_ref = ref(q, k, v, causal)
    out = ours(q, k, v, None)
    assert out.shape == out_ref.shape == (s, b, 4 * hn)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)


def test_rmsnorm_matches_definition_and_marks_sequence_parallel(one_rank):
    from plt_train.models.common.norms import RMSNorm

    _, tc = _tconfig(one_rank)
    norm = RMSNorm(tc, 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    tc.sequence_parallel = True
    assert RMSNorm(tc, 64).weight.sequence_parallel is True  # grads all-reduced over TP


def test_model_is_the_documented_architecture(one_rank):
    """RMSNorm, SwiGLU (gate+up fused in fc1), no biases, RoPE, SDPA core attention."""
    from plt_train.models import build_model
    from plt_train.models.common.norms import RMSNorm
    from plt_train.models.common.sdpa_attention import SDPAttention

    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16)
    (model,), tc, vocab = build_model(m, ParallelConfig(), 1000, torch.float32,
                                      megatron_device_kwargs(one_rank), 1, one_rank.device)
    assert vocab == 1024  # padded to make_vocab_size_divisible_by
    names = dict(model.named_parameters())
    assert not [n for n in names if n.endswith(".bias")]
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 192, 64)  # SwiGLU
    assert isinstance(model.decoder.final_layernorm, RMSNorm)
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert model.position_embedding_type == "rope"


def test_init_is_deterministic_and_scaled(one_rank):
    from plt_train.models import build_model

    m = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=16)
    build = lambda seed: build_model(m, ParallelConfig(), 1000, torch.float32,  # noqa: E731
                                     megatron_device_kwargs(one_rank), seed, one_rank.device)[0][0]
    a, b, c = build(5), build(5), build(6)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.ndim > 1:
            assert not torch.equal(pa, pc), n
    p = dict(a.named_parameters())
    assert torch.equal(p["decoder.layers.0.input_layernorm.weight"], torch.ones(64))
    std_in = p["decoder.layers.0.self_attention.linear_qkv.weight"].std().item()
    std_out = p["decoder.layers.0.self_attention.linear_proj.weight"].std().item()
    assert std_in == pytest.approx(0.02, rel=0.1)
    assert std_out == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)  # residual-branch scaling
    # Different layers get different weights (keys include the global layer offset).
    assert not torch.equal(p["decoder.layers.0.mlp.linear_fc2.weight"],
                           p["decoder.layers.1.mlp.linear_fc2.weight"])
