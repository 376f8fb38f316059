"""lm-evaluation-harness over our models: the harness's numbers equal a direct computation
with the plain forward pass, on the shipped tasks.

For a PLT model (R = 2, G-SWA window 4) and a PLT model with BigMac MoE layers, random
weights (std 0.1, so log-probabilities are far from uniform):
- multiple choice (``plt_tiny_mc``): each choice's log-likelihood from the harness (batched,
  left-padded, longest first) equals the sum of log-softmax of one unpadded forward of
  context + choice, and the harness's accuracy equals the accuracy of those sums;
- generation (``plt_tiny_gen``): the harness's text (KV-cached one-pass decode) equals greedy
  decoding by repeated full forwards without a cache, cut at the first newline, and its
  exact match equals the direct one;
- rolling log-likelihood (perplexity tasks) over a text three windows long equals the
  direct sum over the same disjoint windows.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plt_train.config.schema import LoopConfig, ModelConfig, MoEConfig, ParallelConfig
from plt_train.runtime.device import megatron_device_kwargs

pytest.importorskip("lm_eval")
VOCAB, SEQ = 300, 48


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from plt_train.data.tokenizer import train_bpe

    docs = [f"def f{i}(x):\n    return x * {i}\nimport numpy as np\n" for i in range(200)]
    return train_bpe(docs, VOCAB, tmp_path_factory.mktemp("tok") / "t.tokenizer.json")


MODELS = {
    "plt2": {},
    "plt2_bigmac": {"moe": MoEConfig(layer="bigmac", num_experts=4, top_k=2, ratio=0.25,
                                     dcca_kernel="torch", capacity_factor=None)},
}


def build(dev, **kw):
    from plt_train.models import build_model

    m = ModelConfig(name="plt", num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=SEQ, loops=2, init_method_std=0.1,
                    loop=LoopConfig(window=4, hidden_scale=0.05), **kw)
    # Every setting pinned, so a change of a default does not change the random model: these
    # weights (seed 12) leave no choice and no greedy step of the tests a near tie.
    chunks, _, _ = build_model(m, ParallelConfig(), VOCAB, torch.float32,
                               megatron_device_kwargs(dev), 12, dev.device)
    return chunks[0].eval()


def log_probs(model, tokens: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of one unpadded plain forward."""
    seq = torch.tensor(tokens)[None]
    with torch.no_grad():
        logits = model(seq, torch.arange(len(tokens))[None], None)[0]
    return torch.log_softmax(logits.float(), -1)


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    lp = log_probs(model, context + continuation)[len(context) - 1:-1]
    return float(lp.gather(-1, torch.tensor(continuation)[:, None]).sum())


def direct_greedy(model, tokenizer, prompt: str, max_new: int, stop: str) -> str:
    """Greedy decoding by full forwards (no cache); asserts that no step is a near tie, so
    the comparison with the cached decode cannot flip on rounding."""
    tokens, new = tokenizer.tokenize(prompt), []
    for _ in range(max_new):
        lp = log_probs(model, tokens + new)[-1]
        top = lp.topk(2).values
        assert top[0] - top[1] > 2e-4, "a near tie: pick other weights"
        new.append(int(lp.argmax()))
        if new[-1] == tokenizer.eod:
            break
    return tokenizer.detokenize(new).split(tokenizer.detokenize([tokenizer.eod]))[0] \
        .split(stop)[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_harness_equals_the_direct_computation(one_rank, tokenizer, name):
    from plt_train.evaluation.downstream import evaluate, flat_metrics
    from plt_train.evaluation.harness import PltLM
    from plt_train.evaluation.tasks import resolve, shipped_config

    model = build(one_rank, **MODELS[name])
    lm = PltLM(model, tokenizer, max_length=SEQ, batch_size=5, quiet=True)
    results = evaluate(lm, resolve(["plt_tiny_mc", "plt_tiny_gen"]), log_samples=True)
    metrics = flat_metrics(results)

    # Multiple choice: every choice's log-likelihood, then the accuracy.
    samples = results["samples"]["plt_tiny_mc"]
    assert len(samples) == 16
    correct = []
    for s in samples:
        doc = s["doc"]
        # The harness's split: trailing whitespace of the context goes to the continuation,
        # which is the tokens of context + choice after those of the context.
        context = doc["context"].rstrip()
        ctx = tokenizer.tokenize(context)
        direct = [direct_loglikelihood(
            model, ctx, tokenizer.tokenize(doc["context"] + c)[len(ctx):])
            for c in doc["choices"]]
        harness = [r[0][0] for r in s["resps"]]
        assert harness == pytest.approx(direct, abs=2e-4), doc
        ranked = sorted(direct, reverse=True)
        assert ranked[0] - ranked[1] > 1e-2  # no near tie: the argmax cannot flip
        correct.append(direct.index(ranked[0]) == doc["answer"])
    assert metrics["plt_tiny_mc/acc"] == pytest.approx(sum(correct) / len(correct))

    # Generation through the one-pass decode, against cache-free greedy decoding.
    gen = shipped_config("plt_tiny_gen")["generation_kwargs"]
    samples = results["samples"]["plt_tiny_gen"]
    assert len(samples) == 12
    matches = []
    for s in samples:
        text = direct_greedy(model, tokenizer, s["doc"]["prompt"], gen["max_gen_toks"], "\n")
        assert s["resps"][0][0] == text, s["doc"]
        matches.append(text == s["doc"]["target"])
    assert metrics["plt_tiny_gen/exact_match"] == pytest.approx(sum(matches) / len(matches))
    assert any(s["resps"][0][0] for s in samples)  # not all empty: the check bites


def test_rolling_loglikelihood_over_disjoint_windows(one_rank, tokenizer):
    from plt_train.evaluation.harness import PltLM

    model = build(one_rank)
    L = 16
    lm = PltLM(model, tokenizer, max_length=L, batch_size=2, quiet=True)
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(3))
    tokens = tokenizer.tokenize(text)
    assert 2 * L < len(tokens) < 3 * L  # three windows, the last one partly new
    direct = direct_loglikelihood(model, [tokenizer.eod], tokens[:L])
    for start in range(L, len(tokens), L):
        end = min(start + L, len(tokens))
        direct += direct_loglikelihood(model, tokens[end - L - 1:start], tokens[start:end])
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert got == pytest.approx(direct, abs=5e-4)



def test_the_harness_seeding_is_undone_for_training(one_rank, tokenizer):
    """The harness seeds Python's, NumPy's and torch's generators; the in-training hook puts
    training's back (``rng_kept``), so dropout and anything else random go on unchanged."""
    import random

    import numpy as np

    from plt_train.evaluation.downstream import evaluate, rng_kept
    from plt_train.evaluation.harness import PltLM
    from plt_train.evaluation.tasks import resolve

    def draw():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    def seed():
        torch.manual_seed(7), random.seed(7), np.random.seed(7)

    lm = PltLM(build(one_rank), tokenizer, max_length=SEQ, quiet=True)
    seed()
    expected = draw()
    seed()
    with rng_kept():
        evaluate(lm, resolve(["plt_tiny_mc"]), limit=2)
    assert draw() == expected


def test_training_refuses_unknown_tasks_before_it_starts():
    from plt_train.config import ConfigError
    from plt_train.config.schema import DownstreamConfig
    from plt_train.evaluation.downstream import check_tasks

    resolved = check_tasks(DownstreamConfig(tasks=["plt_tiny_mc", "plt_tiny_gen"], interval=5))
    assert [spec["task"] for spec in resolved.specs] == ["plt_tiny_mc", "plt_tiny_gen"]
    assert check_tasks(DownstreamConfig(tasks=["no_such_task"], interval=0)) is None  # off
    with pytest.raises(ConfigError, match=r"^config error: downstream.tasks: unknown task "
                                          r"'no_such_task': give a shipped task"):
        check_tasks(DownstreamConfig(tasks=["plt_tiny_mc", "no_such_task"], interval=5))


def test_a_generation_longer_than_the_model_is_capped_with_a_warning(one_rank, tokenizer):
    """The harness's default max_gen_toks (256) on a model trained on 48 tokens: half of them
    are generated, with a warning, instead of a crash halfway through an evaluation."""
    from plt_train.evaluation.harness import PltLM

    lm = PltLM(build(one_rank), tokenizer, max_length=SEQ, quiet=True)
    asked, generate = [], lm.generator.generate
    lm.generator.generate = lambda prompts, new, *a, **k: asked.append(new) or \
        generate(prompts, new, *a, **k)
    request = SimpleNamespace(args=("def f(x):", {"until": [], "max_gen_toks": 256}))
    with pytest.warns(UserWarning, match=r"max_gen_toks=256 leaves little of max_length=48"):
        (text,) = lm.generate_until([request])
    assert asked == [SEQ // 2] and text
