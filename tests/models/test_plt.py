"""Looped decoders (vanilla, looped, PLT): structure, causality, G-SWA pieces, FLOPs.

Weights use init std 0.1 so attention is far from uniform: a wrong mask or window changes the
logits by ~0.1 (measured), far above the tolerances used here.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

VOCAB, SEQ = 100, 24


def build(dev, name, loops=1, std=0.1, **loop_kw):
    from plt_train.models import build_model

    m = ModelConfig(name=name, num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=SEQ, loops=loops, init_method_std=std,
                    loop=LoopConfig(**{"window": 4, **loop_kw}))
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 7, dev.device)
    return chunks[0].eval(), m


def tokens(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g), torch.arange(SEQ)[None]


@torch.no_grad()
def test_vanilla_is_the_gpt_model(one_rank):
    gpt, _ = build(one_rank, "gpt")
    vanilla, _ = build(one_rank, "vanilla")
    assert [n for n, _ in gpt.named_parameters()] == [n for n, _ in vanilla.named_parameters()]
    tok, pos = tokens()
    torch.testing.assert_close(vanilla(tok, pos, None), gpt(tok, pos, None), rtol=0, atol=0)


@torch.no_grad()
def test_plt_with_one_loop_is_vanilla(one_rank):
    tok, pos = tokens()
    plt1, _ = build(one_rank, "plt", 1)
    vanilla, _ = build(one_rank, "vanilla")
    torch.testing.assert_close(plt1(tok, pos, None), vanilla(tok, pos, None), rtol=0, atol=0)


def test_shared_weights_are_counted_once(one_rank):
    n = {key: sum(p.numel() for p in build(one_rank, *key)[0].parameters())
         for key in [("vanilla", 1), ("looped", 2), ("looped", 3), ("plt", 2), ("plt", 3)]}
    assert n[("looped", 2)] == n[("looped", 3)] == n[("vanilla", 1)]
    gates = 2 * (4 * 16 + 4)  # layers x (query-gate weight [heads, d] + bias [heads])
    assert n[("plt", 2)] == n[("plt", 3)] == n[("vanilla", 1)] + gates
    plt_, _ = build(one_rank, "plt", 2)
    assert all(float(p.abs().sum()) == 0 for name, p in plt_.named_parameters()
               if "gswa_gate" in name)  # zero-initialised: an even blend at the start


@pytest.mark.parametrize("name,loops,kw", [
    ("looped", 2, {}), ("plt", 2, {}), ("plt", 3, {}), ("plt", 2, {"gswa": False}),
    ("plt", 3, {"gate": "input"})])
@torch.no_grad()
def test_every_loop_is_causal(one_rank, name, loops, kw):
    """Changing token j changes no logit before j (the shift must not leak the future)."""
    model, _ = build(one_rank, name, loops, **kw)
    tok, pos = tokens(batch=1)
    base = model(tok, pos, None)
    j = 11
    changed = tok.clone()
    changed[0, j] = (changed[0, j] + 1) % VOCAB
    out = model(changed, pos, None)
    torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
    assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3


@torch.no_grad()
def test_loops_window_and_gswa_switch_change_the_function(one_rank):
    tok, pos = tokens()
    out = {k: build(one_rank, *k[:2], **dict(k[2:]))[0](tok, pos, None) for k in [
        ("vanilla", 1), ("looped", 2), ("plt", 2), ("plt", 2, ("window", 5)),
        ("plt", 2, ("gswa", False))]}
    keys = list(out)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (out[a] - out[b]).abs().max() > 1e-2, (a, b)


def _rms(t):
    return float(t.pow(2).mean().sqrt())


def _two_loops_at_init(model):
    """(loop 1's input, output; loop 2's input, the block's update to it) on one batch."""
    tok, pos = tokens()
    emb, rope = model.embed(tok, pos), model.rotary_pos_emb(SEQ)
    model.loop_state.begin(0)
    h1 = model.run_block(emb, rope)
    x2 = model.next_loop_input(emb, model.between_loops(h1))
    model.loop_state.begin(1)
    return emb, h1, x2, model.run_block(x2, rope) - x2


@pytest.mark.parametrize("name,kw,normed", [
    ("looped", {}, False), ("plt", {}, True),
    ("plt", {"norm_between_loops": False, "hidden_scale": 1.0}, False)])
@torch.no_grad()
def test_loop_two_starts_near_the_scale_of_loop_one(one_rank, name, kw, normed):
    """At the defaults each later loop's input is within a few times the scale of loop 1's
    (the embeddings', init std 0.02), so the shared block moves it as much as it moves loop
    1's (at least a quarter as much, relative to its input).  Fed on normed with nothing to
    scale it (RMS 1), a looped model's loop 2 was nearly the identity (issue 19; the next
    test); ``normed_loop_feed`` says which form a model takes."""
    model, m = build(one_rank, name, 2, std=0.02, **kw)
    assert m.normed_loop_feed == normed
    emb, h1, x2, update = _two_loops_at_init(model)
    assert 1 < _rms(x2) / _rms(emb) < 4
    assert _rms(update) / _rms(x2) > 0.25 * _rms(h1 - emb) / _rms(emb)


@torch.no_grad()
def test_a_looped_model_with_the_norm_between_loops_barely_moves_loop_two(one_rank):
    """The trap the default avoids, kept measurable: the normed feed (RMS ~1) is ~50x loop
    1's input, so the block's update is ~1 % of it."""
    model, _ = build(one_rank, "looped", 2, std=0.02, norm_between_loops=True)
    _, _, x2, update = _two_loops_at_init(model)
    assert _rms(update) / _rms(x2) < 0.05


def test_detach_switch_changes_gradients_not_values(one_rank):
    tok, pos = tokens()
    labels = torch.roll(tok, -1, 1)
    grads, outs = {}, {}
    for detach in (True, False):
        model, _ = build(one_rank, "plt", 2, detach_kv=detach)
        model.train()
        loss = model(tok, pos, None, labels=labels).mean()
        loss.backward()
        outs[detach] = loss.item()
        grads[detach] = model.decoder.layers[0].self_attention.linear_qkv.weight.grad.clone()
    assert outs[True] == pytest.approx(outs[False], rel=1e-6)
    assert (grads[True] - grads[False]).abs().max() > 1e-5
    assert all(torch.isfinite(g).all() for g in grads.values())


@torch.no_grad()
def test_gate_variants_agree_at_init_and_learn_different_functions(one_rank):
    tok, pos = tokens()
    q, _ = build(one_rank, "plt", 2, gate="query")
    i, _ = build(one_rank, "plt", 2, gate="input")
    torch.testing.assert_close(q(tok, pos, None), i(tok, pos, None), rtol=1e-5, atol=1e-5)
    for model in (q, i):
        for name, p in model.named_parameters():
            if "gswa_gate" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    assert (q(tok, pos, None) - i(tok, pos, None)).abs().max() > 1e-3


def _naive_attention(q, k, v, keep):
    """q [s, b, h, d], k/v [s, b, g, d], keep [b, s, s] -> [s, b, h, d], by explicit loops."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            scores = q[:, bi, hi] @ k[:, bi, hi // rep].T / d ** 0.5
            scores = scores.masked_fill(~keep[bi], float("-inf"))
            out[:, bi, hi] = torch.softmax(scores, -1) @ v[:, bi, hi // rep]
    return out


@pytest.mark.parametrize("window", [1, 3, 7, 40])
def test_window_attention_matches_explicit_definition(window):
    from plt_train.models.plt.ops import causal_attention, window_attention

    g = torch.Generator().manual_seed(window)
    s, b = 13, 2
    q, k, v = (torch.randn(s, b, n, 8, generator=g) for n in (4, 2, 2))
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :5] = False  # left padding of the second sequence
    i, j = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    keep = ((j <= i) & (j > i - window)).unsqueeze(0) & valid[:, None, :]
    keep |= torch.eye(s, dtype=torch.bool)
    got = window_attention(q, k, v, 8 ** -0.5, window, valid)
    torch.testing.assert_close(got, _naive_attention(q, k, v, keep), rtol=1e-5, atol=1e-5)
    causal = (j <= i).unsqueeze(0).expand(b, s, s)
    torch.testing.assert_close(causal_attention(q, k, v, 8 ** -0.5),
                               _naive_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_shift_one_moves_every_token_one_step_and_zeroes_the_first():
    from plt_train.models.plt.ops import shift_one

    h = torch.arange(1.0, 13.0).view(4, 1, 3).repeat(1, 2, 1)  # [s=4, b=2, 3]
    out = shift_one(h)
    assert out[0].abs().sum() == 0
    torch.testing.assert_close(out[1:], h[:-1])
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    padded = shift_one(h, valid)
    assert padded[:3, 1].abs().sum() == 0  # pads and the first real token get zero
    torch.testing.assert_close(padded[3, 1], h[2, 1])


def test_flops_count_every_loop_and_the_window_not_full_attention():
    from plt_train.models.plt.flops import looped_flops_per_sequence, window_pairs

    for S in (1, 5, 64, 100):
        for w in (1, 4, 64):
            assert window_pairs(S, w) == sum(min(i + 1, w) for i in range(S))
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=256,
                    loop=LoopConfig(window=16))
    van = looped_flops_per_sequence(replace(m, name="vanilla"), 128).components
    loo = looped_flops_per_sequence(replace(m, name="looped", loops=3), 128).components
    plt_ = looped_flops_per_sequence(replace(m, name="plt", loops=3), 128).components
    for name in ("qkv_proj", "out_proj", "mlp", "attn_scores"):
        assert loo[name] == 3 * van[name]
    assert loo["lm_head"] == plt_["lm_head"] == van["lm_head"]
    causal, local = 256 * 257 // 2, window_pairs(256, 16)
    assert plt_["attn_scores"] == int(van["attn_scores"] * (3 + 2 * local / causal))
    assert plt_["gswa_gate"] == 2 * 2 * 256 * 2 * 64  # x layers x S x 2*heads*d


def test_tiny_plt_overfits_a_small_batch(one_rank):
    """Memorising two random sequences: only possible if gradients reach every part."""
    model, _ = build(one_rank, "plt", 2, std=0.02)
    model.train()
    tok, pos = tokens(batch=2, seed=3)
    labels = torch.roll(tok, -1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = model(tok, pos, None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # about ln(100) at the start
    assert losses[-1] < 0.2, losses[::25]
    gates = [p for n, p in model.named_parameters() if "gswa_gate" in n]
    assert all(p.abs().sum() > 0 for p in gates)  # the gates learned too
