"""KV-cached generation: one-pass PLT decoding reproduces the full-sequence forward.

For random weights (std 0.1, so attention is far from uniform) and a batch of prompts of
different lengths, the logits of every prefilled position and of every decode step equal the
logits of one plain forward over prompt + generated tokens, for vanilla, looped and PLT with
R = 1, 2, 3.  The window is 4 and 12 tokens are generated, so decoding runs well past it.
The same holds with the decode attention in the Triton kernel (through the interpreter on
CPU) and for the graph-ready static step; on CUDA, for the captured graph.
"""
from __future__ import annotations

import pytest
import torch

from plt_train.config.schema import LoopConfig, ModelConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

VOCAB, WINDOW, NEW = 100, 4, 12


def build(dev, name, loops=1, moe=None, **loop_kw):
    from plt_train.models import build_model

    m = ModelConfig(name=name, num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=64, loops=loops, init_method_std=0.1,
                    loop=LoopConfig(**{"window": WINDOW, **loop_kw}),
                    **({"moe": moe} if moe else {}))
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 11, dev.device)
    return chunks[0].eval()


def prompts(lengths=(5, 9, 1)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


CASES = [("vanilla", 1, {}), ("looped", 2, {}), ("looped", 3, {}), ("plt", 1, {}),
         ("plt", 2, {}), ("plt", 3, {}), ("plt", 2, {"gswa": False}),
         ("plt", 2, {"shared_kv": False}), ("plt", 3, {"shared_kv": False}),
         ("plt", 3, {"gate": "input", "detach_kv": False, "norm_between_loops": False,
                     "emb_scale": 0.5, "hidden_scale": 2.0})]


@pytest.mark.parametrize("name,loops,kw", CASES,
                         ids=[f"{n}{r}{'-' + '-'.join(kw) if kw else ''}" for n, r, kw in CASES])
def test_decoding_reproduces_the_full_forward_at_every_position(one_rank, name, loops, kw):
    from plt_train.inference import Generator

    model = build(one_rank, name, loops, **kw)
    ps = prompts()
    out = Generator(model).generate(ps, NEW)
    assert_reproduces_full_forward(model, ps, out, NEW)


def assert_reproduces_full_forward(model, ps, out, new, tol=1e-4):
    assert out.step_logits.shape == (len(ps), new, model.vocab_size)
    for b, p in enumerate(ps):
        seq = torch.tensor(p + out.tokens[b], device=out.step_logits.device)[None]
        with torch.no_grad():
            full = model(seq, torch.arange(seq.shape[1], device=seq.device)[None], None)[0]
        L = len(p)
        torch.testing.assert_close(out.prompt_logits[b, out.pad[b]:], full[:L],
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(out.step_logits[b], full[L - 1:L - 1 + new],
                                   rtol=tol, atol=tol)
    # Greedy: each generated token is the argmax of the logits it came from.
    assert out.tokens == out.step_logits.argmax(-1).tolist()


@pytest.mark.parametrize("moe", [None, "bigmac"])
def test_gpt_weights_decode_as_vanilla(one_rank, moe):
    """Why a gpt checkpoint may be decoded by the vanilla decoder: loaded with a GPTModel's
    weights, it gives that GPTModel's logits (then decoding reproduces them, as for every
    decoder above)."""
    from plt_train.config.schema import MoEConfig
    from plt_train.inference import Generator, as_decoder
    from plt_train.models import build_model

    m = ModelConfig(name="gpt", num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=64, init_method_std=0.1,
                    **({"moe": MoEConfig(layer=moe, num_experts=4, top_k=2, ratio=0.25,
                                         dcca_kernel="torch", capacity_factor=None)}
                       if moe else {}))
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(one_rank), 11, one_rank.device)
    gpt = chunks[0].eval()
    vanilla = as_decoder(gpt, m).eval()
    assert type(vanilla).__name__ == "LoopedGPTModel" and vanilla.loops == 1
    seq = torch.tensor(prompts((17,))[0], device=one_rank.device)[None]
    pos = torch.arange(seq.shape[1], device=seq.device)[None]
    with torch.no_grad():
        expected = gpt(seq, pos, None)
        got = vanilla(seq, pos, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ps = prompts()
    out = Generator(vanilla).generate(ps, NEW)
    assert_reproduces_full_forward(vanilla, ps, out, NEW)


@pytest.mark.parametrize("loops", [2, 3])
def test_decode_kernel_reproduces_the_full_forward(one_rank, loops, monkeypatch):
    """model.loop.kernel=triton: each PLT layer's decode attention is one Triton launch."""
    from plt_train.kernels import plt_decode
    from plt_train.inference import Generator

    model = build(one_rank, "plt", loops, kernel="triton")
    launches = []
    original = plt_decode.plt_decode_attention
    monkeypatch.setattr(plt_decode, "plt_decode_attention",
                        lambda *a, **k: launches.append(1) or original(*a, **k))
    ps, new = prompts((5, 1)), 5
    # Eager steps: a CUDA graph's replays run no Python, so they could not be counted.
    out = Generator(model, cuda_graph="off").generate(ps, new)
    assert len(launches) == (new - 1) * 2  # decode steps x layers
    model.opts.kernel = "torch"  # the oracle: the pure-torch full forward
    assert_reproduces_full_forward(model, ps, out, new)


@pytest.mark.parametrize("name,loops", [("plt", 3), ("looped", 2)])
def test_static_decode_step_equals_the_eager_one(one_rank, name, loops):
    """The graph's buffers, copies and in-place fed-on outputs, run without capturing."""
    from plt_train.inference import Generator

    model = build(one_rank, name, loops)
    eager = Generator(model, cuda_graph="off").generate(prompts(), 6)
    gen = Generator(model, cuda_graph="static")
    static = gen.generate(prompts(), 6)
    assert gen.step_mode == "static" and gen._static is not None
    assert static.tokens == eager.tokens
    assert torch.equal(static.step_logits, eager.step_logits)


def test_auto_falls_back_to_eager_when_the_step_cannot_be_captured(one_rank, monkeypatch):
    """Under cuda_graph=auto a capture failure (say, a host sync in a layer we did not foresee)
    warns and decodes eagerly with the same result; an explicit choice raises."""
    import plt_train.inference.generator as generator
    from plt_train.inference import Generator

    def uncapturable(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = build(one_rank, "plt", 2)
    eager = Generator(model, cuda_graph="off").generate(prompts(), 4)
    monkeypatch.setattr(generator, "StaticDecodeStep", uncapturable)
    gen = Generator(model, cuda_graph="auto")
    gen.step_mode = "graph"  # what auto picks on CUDA
    with pytest.warns(UserWarning, match="not capturable"):
        out = gen.generate(prompts(), 4)
    assert gen.step_mode == "eager" and out.tokens == eager.tokens
    assert torch.equal(out.step_logits, eager.step_logits)
    strict = Generator(model, cuda_graph="static")
    with pytest.raises(RuntimeError, match="capturing"):
        strict.generate(prompts(), 4)


def test_cuda_graph_choice():
    from types import SimpleNamespace

    from plt_train.inference.generator import step_mode

    dense, moe = (SimpleNamespace(config=SimpleNamespace(num_moe_experts=n)) for n in (None, 8))
    assert step_mode("auto", dense, "cpu") == "eager"
    assert step_mode("auto", dense, "cuda") == "graph"
    assert step_mode("auto", moe, "cuda") == "eager"  # routing syncs with the host
    assert step_mode("off", dense, "cuda") == "eager"
    with pytest.raises(ValueError, match="CUDA device"):
        step_mode("on", dense, "cpu")
    with pytest.raises(ValueError, match="MoE"):
        step_mode("on", moe, "cuda")
    with pytest.raises(ValueError):
        step_mode("yes", dense, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA GPU (the CPU tests cover the static step)")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_cuda_graph_decode_equals_eager(one_rank, kernel):
    from plt_train.inference import Generator

    model = build(one_rank, "plt", 3, kernel=kernel)
    eager = Generator(model, cuda_graph="off").generate(prompts(), NEW)
    gen = Generator(model, cuda_graph="on")
    graphed = gen.generate(prompts(), NEW)
    assert gen._static.graph is not None
    assert graphed.tokens == eager.tokens
    torch.testing.assert_close(graphed.step_logits, eager.step_logits, rtol=1e-4, atol=1e-4)
    assert_reproduces_full_forward(model, prompts(), graphed, NEW, tol=1e-3)


@pytest.mark.parametrize("name,loops", [("vanilla", 1), ("plt", 2)])
def test_moe_generation_is_dropless_so_no_prompt_depends_on_its_batch(one_rank, name, loops):
    """megatron-core drops over-capacity tokens in eval mode too, over all the tokens of a
    call: with capacity 1.2 a prompt's logits changed with the other prompts of its batch and
    the decode left the full forward (by 0.03 here).  Generation routes dropless: every
    prompt's logits equal those it gets alone, and a dropless full forward's."""
    from plt_train.config.schema import MoEConfig
    from plt_train.inference import Generator

    moe = dict(layer="bigmac", num_experts=4, top_k=2, ratio=0.25, dcca_kernel="torch",
               expert_gemm="loop")
    model = build(one_rank, name, loops, moe=MoEConfig(capacity_factor=1.2, **moe))
    ps = prompts((5, 9, 1))
    together = Generator(model, cuda_graph="off").generate(ps, 6)
    for b, p in enumerate(ps):
        alone = Generator(model, cuda_graph="off").generate([p], 6)
        torch.testing.assert_close(together.prompt_logits[b, together.pad[b]:],
                                   alone.prompt_logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.step_logits[b], alone.step_logits[0],
                                   rtol=1e-5, atol=1e-5)
    assert model.config.moe_expert_capacity_factor == 1.2  # restored for training
    dropless = build(one_rank, name, loops, moe=MoEConfig(capacity_factor=None, **moe))
    dropless.load_state_dict(model.state_dict())
    assert_reproduces_full_forward(dropless, ps, together, 6)


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
    # Without G-SWA the later loops read loop 1's KV only: no windows are kept.
    assert Generator(build(one_rank, "plt", 3, gswa=False)).generate(ps, NEW).kv_bytes == base
    # Cross-loop parallelism without shared K/V: every loop its own full cache, as looped.
    for r in (2, 3):
        no_sharing = Generator(build(one_rank, "plt", r, shared_kv=False)).generate(ps, NEW)
        assert no_sharing.kv_bytes == r * base


def test_a_decode_step_past_the_cache_is_refused_before_it_writes(one_rank):
    from plt_train.inference import Generator

    gen = Generator(build(one_rank, "plt", 2), cuda_graph="off")
    cache = gen.new_cache(1, 4)
    tokens = torch.tensor([[1, 2, 3]])
    logits, fed = gen.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), cache)
    token = logits[:, -1].argmax(-1)
    gen.decode(token, torch.tensor([3]), fed, cache)  # the 4th and last position
    before = [t.clone() for t in (cache.valid, *cache.full[(0, 1)], *cache.win[1])]
    with pytest.raises(RuntimeError, match="KV cache full"):
        gen.decode(token, torch.tensor([4]), fed, cache)
    after = (cache.valid, *cache.full[(0, 1)], *cache.win[1])
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and cache.length == 4


def test_plt_decodes_all_loops_in_one_pass_looped_needs_r(one_rank, monkeypatch):
    from plt_train.inference import Generator

    for name, loops, passes, kw in [("plt", 3, 1, {}), ("plt", 3, 1, {"shared_kv": False}),
                                    ("looped", 3, 3, {}), ("vanilla", 1, 1, {})]:
        model = build(one_rank, name, loops, **kw)
        calls = []
        original = model.run_block
        monkeypatch.setattr(model, "run_block",
                            lambda x, rope: calls.append(x.shape[1]) or original(x, rope))
        Generator(model, cuda_graph="off").generate(prompts((4, 6)), 5)  # eager: countable
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


class _Tokens:
    """A tokenizer stand-in: characters as token ids."""

    eod = None

    def tokenize(self, text: str) -> list:
        return [ord(c) % VOCAB for c in text]

    def detokenize(self, ids: list) -> str:
        return "".join(chr(32 + i) for i in ids)


def test_the_end_of_training_sample_is_sampled_and_reproducible(one_rank):
    """The default sample (``SampleConfig``) is nucleus-sampled, not greedy (a small model's
    greedy continuation repeats itself), and the same seed gives the same text."""
    from dataclasses import replace

    from plt_train.config.schema import SampleConfig
    from plt_train.inference import sample_after_training

    model = build(one_rank, "plt", 2)
    default = SampleConfig(prompt="def main(", max_new_tokens=24)
    assert default.temperature > 0 and default.top_p < 1
    first = sample_after_training([model], _Tokens(), default)
    assert first == sample_after_training([model], _Tokens(), default)  # the same seed
    others = {sample_after_training([model], _Tokens(), replace(default, seed=s))
              for s in (1, 2, 3)}
    greedy = sample_after_training([model], _Tokens(), replace(default, temperature=0.0))
    assert len(others | {first}) > 1 and first != greedy
