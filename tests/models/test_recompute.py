"""Activation recompute (``model.recompute``) reproduces the run without it, and saves memory.

One process, fp32, dropout on: for each model and mode the loss and every parameter's gradient
equal those of the same model without recompute (tight tolerance: the same operations, only
the order in which autograd adds a shared block's per-loop gradients may differ), and the bytes
saved for backward (``models.memory.saved_activation_bytes``) shrink, which fails if a mode
silently recomputes nothing.  The layouts (TP=2, PP=2) are in
``tests/distributed/test_plt_parity.py``.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import (
    LoopConfig, ModelConfig, MoEConfig, ParallelConfig, RecomputeConfig,
)
from plt_train.runtime.device import megatron_device_kwargs

VOCAB, SEQ, BATCH = 96, 32, 2
BIGMAC = dict(layer="bigmac", num_experts=8, top_k=2, capacity_factor=None, aux_loss_coeff=0.01)

MODELS = {
    "gpt": dict(name="gpt"),
    "looped-2": dict(name="looped", loops=2),
    "plt-2": dict(name="plt", loops=2),
    "plt-2-grad-kv": dict(name="plt", loops=2, loop=dict(detach_kv=False)),
    "plt-2-bigmac": dict(name="plt", loops=2, moe=BIGMAC),
    "gpt-bigmac": dict(name="gpt", moe=BIGMAC),
}
# (granularity, num_layers, modules, largest allowed fraction of the bytes saved without it)
MODES = {
    "full": ("full", None, [], 0.25),
    "full-first-layer": ("full", 1, [], 0.7),
    "selective": ("selective", None, ["core_attn", "layernorm", "mlp"], 0.6),
    "core-attention": ("selective", None, ["core_attn"], 0.999),
}


def build(dev, spec: dict, recompute: RecomputeConfig):
    from plt_train.models import build_model

    spec = dict(spec)
    loop = LoopConfig(window=8, **spec.pop("loop", {}))
    moe = MoEConfig(**spec.pop("moe", {}))
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    seq_length=SEQ, init_method_std=0.05, hidden_dropout=0.1, loop=loop,
                    moe=moe, recompute=recompute, **spec)
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 7, dev.device)
    return chunks[0].train()


def step(model):
    """Loss, gradients and activation bytes of one forward/backward on fixed tokens with
    fixed dropout masks."""
    from plt_train.models.memory import saved_activation_bytes

    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ)[None]
    torch.manual_seed(11)
    nbytes, loss = saved_activation_bytes(
        lambda: model(tok, pos, None, labels=labels).float().mean(), list(model.parameters()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, nbytes


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_recompute_reproduces_loss_and_gradients(one_rank, name, mode):
    granularity, num_layers, modules, max_fraction = MODES[mode]
    if MODELS[name].get("moe"):
        modules = [m.replace("mlp", "moe") for m in modules]
    base_loss, base_grads, base_bytes = step(build(one_rank, MODELS[name], RecomputeConfig()))
    rc = RecomputeConfig(granularity=granularity, num_layers=num_layers,
                         modules=modules or ["core_attn"])
    loss, grads, nbytes = step(build(one_rank, MODELS[name], rc))

    torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == base_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[key], rtol=1e-5, atol=1e-7, msg=key)
    # Every parameter learns (the G-SWA gate starts at zero but gets a gradient).
    assert all(float(g.abs().sum()) > 0 for g in base_grads.values())
    assert nbytes < max_fraction * base_bytes, (nbytes, base_bytes)


def test_full_recompute_keeps_loop_one_kv_queue_balanced(one_rank):
    """After a training forward of PLT-2 under full recompute every shared-K/V queue is
    empty: loop 1 queued each layer's K/V once and loop 2 took it (a recompute that queued
    again, or a later loop that did not take its entry, would leave one behind and pair the
    next micro-batch with stale K/V)."""
    model = build(one_rank, MODELS["plt-2"], RecomputeConfig(granularity="full"))
    step(model)
    assert model.loop_state.shared_kv and all(
        not q for q in model.loop_state.shared_kv.values())
    assert model.loop_state.held is None


@pytest.mark.parametrize("bad,fix", [
    (dict(granularity="selective", modules=["attention"]), "model.recompute.modules"),
    (dict(granularity="selective", modules=[]), "model.recompute.modules"),
    (dict(granularity="selective", modules=["moe"]), "model.recompute.modules"),
    (dict(granularity="selective", num_layers=1), "model.recompute.num_layers"),
    (dict(granularity="full", num_layers=5), "model.recompute.num_layers"),
])
def test_bad_recompute_options_are_one_line_errors(bad, fix):
    from plt_train.config import ConfigError
    from plt_train.config.schema import RunConfig
    from plt_train.config.validate import validate

    cfg = RunConfig()
    cfg.model = ModelConfig(num_layers=4, recompute=RecomputeConfig(**bad))
    with pytest.raises(ConfigError, match=fix.replace(".", r"\.")):
        validate(cfg, 1)
