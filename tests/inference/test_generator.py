"""KV-cached generation: one-pass PLT decoding reproduces the full-sequence forward.

For random weights (std 0.1, so attention is far from uniform) and a batch of prompts of
different lengths, the logits of every prefilled position and of every decode step equal the
logits of one plain forward over prompt + generated tokens, for vanilla, looped and PLT with
R = 1, 2, 3.  The window is 4 and 12 tokens are generated, so decoding runs well past it.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

VOCAB, WINDOW, NEW = 100, 4, 12


def build(dev, name, loops=1, **loop_kw):
    from plt_train.models import build_model

    m = ModelConfig(name=name, num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=64, loops=loops, init_method_std=0.1,
                    loop=LoopConfig(**{"window": WINDOW, **loop_kw}))
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 11, dev.device)
    return chunks[0].eval()


def prompts(lengths=(5, 9, 1)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


CASES = [("vanilla", 1, {}), ("looped", 2, {}), ("looped", 3, {}), ("plt", 1, {}),
         ("plt", 2, {}), ("plt", 3, {}), ("plt", 2, {"gswa": False}),
         ("plt", 3, {"gate": "input", "detach_kv": False, "norm_between_loops": False,
                     "emb_scale": 0.5, "hidden_scale": 2.0})]


@pytest.mark.parametrize("name,loops,kw", CASES,
                         ids=[f"{n}{r}{'-' + '-'.join(kw) if kw else ''}" for n, r, kw in CASES])
def test_decoding_reproduces_the_full_forward_at_every_position(one_rank, name, loops, kw):
    from plt_train.inference import Generator

    model = build(one_rank, name, loops, **kw)
    ps = prompts()
    out = Generator(model).generate(ps, NEW)
    assert out.step_logits.shape == (3, NEW, model.vocab_size)
    for b, p in enumerate(ps):
        seq = torch.tensor(p + out.tokens[b])[None]
        with torch.no_grad():
            full = model(seq, torch.arange(seq.shape[1])[None], None)[0]
        L = len(p)
        torch.testing.assert_close(out.prompt_logits[b, out.pad[b]:], full[:L],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.step_logits[b], full[L - 1:L - 1 + NEW],
                                   rtol=1e-4, atol=1e-4)
    # Greedy: each generated token is the argmax of the logits it came from.
    assert out.tokens == out.step_logits.argmax(-1).tolist()


def test_kv_bytes_plt_is_loop_one_plus_windows_looped_is_r_times(one_rank):
    from plt_train.inference import Generator

    ps = prompts((20, 7))
    S = 20 + NEW  # cached positions
    kv = {(n, r): Generator(build(one_rank, n, r)).generate(ps, NEW).kv_bytes
          for n, r in [("vanilla", 1), ("looped", 2), ("looped", 3), ("plt", 2), ("plt", 3)]}
    base = kv[("vanilla", 1)]
    assert base == 2 * 2 * 2 * 2 * S * 16 * 4  # layers x (k, v) x batch x kv heads x S x d x 4B
    for r in (2, 3):
        assert kv[("looped", r)] == r * base
        assert kv[("plt", r)] / base == pytest.approx(1 + (r - 1) * WINDOW / S, rel=0, abs=1e-12)


def test_plt_decodes_all_loops_in_one_pass_looped_needs_r(one_rank, monkeypatch):
    from plt_train.inference import Generator

    for name, loops, passes in [("plt", 3, 1), ("looped", 3, 3), ("vanilla", 1, 1)]:
        model = build(one_rank, name, loops)
        calls = []
        original = model.run_block
        monkeypatch.setattr(model, "run_block",
                            lambda x, rope: calls.append(x.shape[1]) or original(x, rope))
        Generator(model).generate(prompts((4, 6)), 5)
        prefill_calls = loops if name != "vanilla" else 1
        decode_calls = calls[prefill_calls:]
        assert len(decode_calls) == 4 * passes, (name, calls)
        # PLT's single pass carries R rows per sequence; looped passes carry one.
        assert set(decode_calls) == {2 * (loops if name == "plt" else 1)}


def test_sampling_greedy_top_p_and_temperature():
    from plt_train.inference import sample

    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, gen).eq(1).all()
    nucleus = sample(logits, 1.0, 0.5, gen)  # token 1 alone holds ~51% of the mass
    assert nucleus.eq(1).all()
    both = sample(logits, 1.0, 0.9, gen)  # tokens 1 and 2 (~98%), never 0 or 3
    assert set(both.tolist()) == {1, 2}
    hot = sample(logits, 100.0, 1.0, gen)  # near-uniform at a high temperature
    assert set(hot.tolist()) == {0, 1, 2, 3}
    again = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(5))
    assert again.tolist() == sample(logits, 1.0, 1.0, torch.Generator().manual_seed(5)).tolist()
