"""``model.compile``: compiled transformer layers (models/compile.py).

* Graph breaks, counted with ``torch._dynamo.explain`` on one layer's forward: none for a dense
  layer and for a PLT layer in either loop (G-SWA through the reference or through the Triton
  kernel, a custom op); an MoE layer traced through breaks only at the dispatcher's named
  host syncs, and as compiled (its MoE MLP eager) only at the MoE's call.  The backward of a
  compiled graph is one AOTAutograd graph per forward graph, so it has none of its own.
* Compiled equals eager (inductor's C++ backend on CPU, dropout off: inductor draws its own
  masks): loss and every gradient, for PLT-2 with BigMac layers and both Triton kernels
  (interpreter), with the recompile limit low enough that a model whose limit
  ``compile_layers`` did not raise would fall back to eager.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import LoopConfig, ModelConfig, MoEConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

VOCAB, SEQ, BATCH = 96, 32, 2
BIGMAC = dict(layer="bigmac", num_experts=8, top_k=2, capacity_factor=None, aux_loss_coeff=0.01)


def config(name="gpt", loops=1, kernel="torch", moe=None) -> ModelConfig:
    return ModelConfig(name=name, loops=loops, num_layers=2, hidden_size=64,
                       num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
                       init_method_std=0.05, loop=LoopConfig(window=8, kernel=kernel),
                       moe=MoEConfig(**(moe or {})))


def build(dev, model: ModelConfig):
    from plt_train.models import build_model

    chunks, _, _ = build_model(model, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 7, dev.device)
    return chunks[0].train()


def layer_breaks(model, loop: int = 0):
    """(graphs, breaks) of the first layer's forward in ``loop`` (loop 1's K/V queued first)."""
    from plt_train.models.compile import graph_breaks

    layer = model.decoder.layers[0]
    x = torch.randn(SEQ, BATCH, 64, requires_grad=True)
    rope = model.rotary_pos_emb(SEQ)

    def forward(h):
        return layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rope)[0]

    if loop:
        model.loop_state.begin(0)
        forward(x)
        model.loop_state.begin(loop)
    return graph_breaks(forward, x)


@pytest.mark.parametrize("name,loop,kernel", [
    ("gpt", 0, "torch"), ("plt", 0, "torch"), ("plt", 1, "torch"), ("plt", 1, "triton")])
def test_dense_and_plt_layers_trace_to_one_graph(one_rank, name, loop, kernel):
    model = build(one_rank, config(name, loops=2 if name == "plt" else 1, kernel=kernel))
    graphs, breaks = layer_breaks(model, loop)
    assert [b.as_dict() for b in breaks] == [] and graphs == 1


def test_moe_layers_break_only_at_the_dispatchers_host_syncs(one_rank):
    """Traced through, with the fused DCCA kernels as custom ops (megatron's own permutation
    adds its masked_selects, also named: scripts/bench_compile.py's "bigmac" row)."""
    model = build(one_rank, config(moe=dict(BIGMAC, dcca_kernel="triton")))
    graphs, breaks = layer_breaks(model)
    unnamed = [b.as_dict() for b in breaks if b.host_sync is None]
    assert unnamed == [] and breaks and graphs > 1


def test_compiled_moe_layers_run_the_moe_eagerly(one_rank):
    """``compile_layers`` leaves the MoE MLP eager (its traced code recompiled every step):
    the layer breaks there and nowhere else."""
    from plt_train.models.compile import MOE_HOST_SYNCS, keep_moe_eager

    model = build(one_rank, config(moe=dict(BIGMAC)))
    keep_moe_eager(model.decoder.layers[0])
    graphs, breaks = layer_breaks(model)
    eager_moe = next(iter(MOE_HOST_SYNCS.values()))
    assert breaks and {b.host_sync for b in breaks} == {eager_moe} and graphs <= 3


def _step(model):
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss = model(tok, torch.arange(SEQ)[None], None, labels=labels).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_equal_eager(one_rank):
    """PLT-2 with BigMac layers and both kernels: compiled loops, a compiled G-SWA custom op,
    an eager MoE (dense gpt under TP=2 + SP through the training loop:
    tests/distributed/test_parity.py)."""
    from torch._dynamo.utils import counters

    from plt_train.models.compile import compile_layers

    model = config("plt", loops=2, kernel="triton", moe=dict(BIGMAC, dcca_kernel="triton"))
    want_loss, want = _step(build(one_rank, model))
    compiled = build(one_rank, model)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        compile_layers([compiled], model, one_rank.device)
        loss, grads = _step(compiled)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Every (layer, loop) ran compiled: dynamo never gave up on a frame for having compiled
    # too many variants of it (it would run it eager from then on).
    assert counters["stats"]["unique_graphs"] >= 1
    assert [k for k in counters["unimplemented"] if "recompile limit" in k] == []
    torch._dynamo.reset()
