"""The synthetic multi-hop task (issue 19, part 1): deterministic per seed, well-formed, and
scored correctly on known answers."""
from __future__ import annotations

import random

import pytest

from plt_train.data.synthetic import (
    ASSIGN, QUERY, SEP, FunctionChains, KeyValueRecall, PointerChasing, VariableChains,
    exact_match, read_test, tokenizer_for, write_task,
)


def resolve(prompt: list[str]) -> list[str]:
    """Follow the queried variable through the statements (the task's ground truth)."""
    body = prompt[:prompt.index(QUERY)]
    rules, statement = {}, []
    for tok in body:
        if tok == SEP:
            rules[statement[0]] = statement[2:]
            statement = []
        else:
            statement.append(tok)
    value = [prompt[-2]]
    while value[0] in rules:
        value = rules[value[0]]
    return value


@pytest.mark.parametrize("task", [VariableChains(), VariableChains(hops=4, chains=2,
                                                                   answer_digits=3)])
def test_examples_have_one_answer_reached_in_exactly_hops_steps(task):
    rng = random.Random(7)
    for _ in range(200):
        doc = task.document(random.Random(rng.random()))
        assert len(doc) + 1 == task.document_length  # + EOD
        queries = [i for i, t in enumerate(doc) if t == QUERY]
        assert len(queries) == task.chains  # every chain asked once, answers right
        for q in queries:
            assert resolve(doc[:q + 3]) == doc[q + 3:q + 3 + task.answer_digits]
        prompt, answer = task.example(rng)
        assert len(prompt) < task.document_length
        assert prompt[-3:-1] == [QUERY, prompt[-2]] and prompt[-1] == ASSIGN
        assert resolve(prompt) == answer
        # exactly `hops` statements are followed, and every left side is assigned once
        lefts = [prompt[i - 1] for i, t in enumerate(prompt[:-3]) if t == ASSIGN]
        assert len(lefts) == len(set(lefts)) == task.hops * task.chains
        var, hops = prompt[-2], 0
        while var.startswith("v"):
            i = next(i for i in range(len(prompt) - 3)  # its one assignment: "var = ..."
                     if prompt[i] == var and prompt[i + 1] == ASSIGN)
            var, hops = prompt[i + 2], hops + 1
        assert hops == task.hops


def test_function_chains_compose_the_fixed_tables():
    task = FunctionChains(hops=4, functions=3, values=5, seed=2)
    tables = task.tables()
    assert tables == FunctionChains(hops=4, functions=3, values=5, seed=2).tables()
    assert tables != FunctionChains(hops=4, functions=3, values=5, seed=3).tables()
    assert all(sorted(t) == list(range(5)) for t in tables)  # permutations
    rng = random.Random(1)
    for _ in range(100):
        doc = task.document(rng)
        assert len(doc) + 1 == task.document_length and doc[-1] == SEP
        x, fs = int(doc[0][1:]), [int(f[1:]) for f in doc[1:1 + task.hops]]
        values = [x]
        for f in fs:
            values.append(tables[f][values[-1]])
        assert doc[1 + task.hops] == ASSIGN
        assert doc[2 + task.hops:4 + task.hops] == [f"x{values[-2]}", f"x{values[-1]}"]


def test_key_value_recall_answers_every_query_from_its_pair():
    task = KeyValueRecall(pairs=5, queries=4, symbols=15)
    rng = random.Random(3)
    asked_twice = 0
    for _ in range(300):
        doc = task.document(rng)
        assert len(doc) + 1 == task.document_length and doc[-1] == SEP
        bar = doc.index("|")
        context, queries = doc[:bar], doc[bar + 1:-1]
        assert bar == 15 and len(set(context)) == 15  # keys and values all distinct
        value_of = {context[i]: context[i + 1:i + 3] for i in range(0, bar, 3)}
        keys = queries[0::3]
        assert len(keys) == 4 and all(queries[i + 1:i + 3] == value_of[queries[i]]
                                      for i in range(0, len(queries), 3))
        asked_twice += len(set(keys)) < len(keys)  # drawn with replacement
        prompt, answer = task.example(rng)
        bar = prompt.index("|")
        value_of = {prompt[i]: prompt[i + 1:i + 3] for i in range(0, bar, 3)}
        assert (len(prompt) - bar - 2) % 3 == 0  # whole queries, then one key
        assert answer == value_of[prompt[-1]]
    assert asked_twice > 50  # no "each key once" shortcut
    # the distance back to the asked key's latest occurrence (the window a lookup needs)
    prompt = "t1 t2 t3 t4 t5 t6 | t4 t5 t6 t1 t2 t3 t4".split()
    assert KeyValueRecall.lookup_distance(prompt) == 6
    assert KeyValueRecall.lookup_distance(prompt[:-4] + ["t1"]) == 10
    with pytest.raises(ValueError, match="symbols"):
        KeyValueRecall(pairs=5, queries=4, symbols=14)


def follow(context: list[str], symbol: str) -> list[str]:
    """The value reached from ``symbol`` by following the context's tables (the task's
    ground truth, worked out independently): ``x y`` pairs, then ``y v v'`` triples."""
    *tables, last, _ = " ".join(context).split("|")
    assert all(len(set(t.split())) == len(t.split()) for t in tables + [last])  # once each
    step = {}
    for table in tables:
        words = table.split()
        step.update(zip(words[0::2], words[1::2]))
    words = last.split()
    values = {words[i]: words[i + 1:i + 3] for i in range(0, len(words), 3)}
    while symbol not in values:
        symbol = step[symbol]
    return values[symbol]


@pytest.mark.parametrize("hops", [2, 3])
def test_pointer_chasing_answers_follow_every_table(hops):
    task = PointerChasing(hops=hops, pairs=4, queries=6, symbols=8)
    rng = random.Random(hops)
    lookups = set()
    for _ in range(200):
        doc = task.document(rng)
        assert len(doc) + 1 == task.document_length and doc[-1] == SEP
        bar = len(doc) - 1 - doc[::-1].index("|")
        context, questions = doc[:bar + 1], doc[bar + 1:-1]
        assert context.count("|") == hops
        for i in range(0, len(questions), 3):
            assert questions[i + 1:i + 3] == follow(context, questions[i])
            lookups.add(hops - "abcdefgh".index(questions[i][0]))  # tables to go
        prompt, answer = task.example(rng)
        bar = len(prompt) - 1 - prompt[::-1].index("|")
        asked = prompt[bar + 1:]
        assert len(asked) % 3 == 1 and asked[-1][0] == "a"  # all the lookups
        assert asked[-1] not in asked[:-1:3]  # never asked before in the prompt
        assert answer == follow(prompt[:bar + 1], prompt[-1])
    assert lookups == set(range(1, hops + 1))  # every number of lookups is taught
    assert task.document(random.Random(5)) == task.document(random.Random(5))  # per seed
    assert task.document(random.Random(5)) != task.document(random.Random(6))
    # a known context: a0 -> b1 -> c2 c3 and a1 -> b0 -> c1 c0
    known = "a1 b0 a0 b1 | b1 c2 c3 b0 c1 c0 |".split()
    assert follow(known, "a0") == ["c2", "c3"] and follow(known, "b0") == ["c1", "c0"]
    with pytest.raises(ValueError, match="symbols"):
        PointerChasing(pairs=5, symbols=9)
    with pytest.raises(ValueError, match="hops"):
        PointerChasing(hops=8)


def test_the_same_seed_writes_the_same_files_another_seed_others(tmp_path):
    task = VariableChains(hops=2, chains=2)
    a = write_task(task, tmp_path / "a", 300, 20, seed=5)
    b = write_task(task, tmp_path / "b", 300, 20, seed=5)
    c = write_task(task, tmp_path / "c", 300, 20, seed=6)
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        assert (tmp_path / "a" / f"train{suffix}").read_bytes() == \
            (tmp_path / "b" / f"train{suffix}").read_bytes()
    assert a.test.read_bytes() == b.test.read_bytes()
    assert (tmp_path / "a/train.bin").read_bytes() != (tmp_path / "c/train.bin").read_bytes()
    assert a.test.read_bytes() != c.test.read_bytes()
    test = read_test(a.test)
    assert len(test) == 20 and all(resolve(p) == ans for p, ans in test)
    # the training data is the same pipeline's indexed dataset: documents of one length,
    # each an example with its answer, in the tokenizer's ids
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = tokenizer_for(task)
    docs = IndexedDataset(a.prefix)
    assert len(docs) == 300
    first = [tok.hf.id_to_token(int(t)) for t in docs[0]]
    assert len(first) == task.document_length and first[-1] == "<|endoftext|>"
    q = first.index(QUERY)
    assert resolve(first[:q + 3]) == first[q + 3:q + 3 + task.answer_digits]
    assert not set(test[0][0]) - set(task.vocabulary())


class _Oracle:
    """A stand-in generator that answers from the prompt itself (or wrongly on purpose)."""

    def __init__(self, tok, wrong_every: int = 0):
        self.tok, self.wrong_every, self.calls = tok, wrong_every, 0

    def generate(self, prompts, max_new_tokens, temperature=0.0):
        from types import SimpleNamespace

        assert temperature == 0.0  # greedy scoring
        tokens = []
        for ids in prompts:
            self.calls += 1
            answer = resolve([self.tok.hf.id_to_token(i) for i in ids])
            if self.wrong_every and self.calls % self.wrong_every == 0:
                answer = answer[:-1] + [str((int(answer[-1]) + 1) % 10)]  # last digit off
            got = [self.tok.hf.token_to_id(t) for t in answer]
            tokens.append((got + [self.tok.hf.token_to_id(SEP)] * max_new_tokens)
                          [:max_new_tokens])
        return SimpleNamespace(tokens=tokens)


def test_exact_match_counts_only_whole_answers():
    task = VariableChains(hops=2, chains=3)
    tok = tokenizer_for(task)
    rng = random.Random(0)
    examples = [task.example(rng) for _ in range(40)]
    assert exact_match(_Oracle(tok), tok, examples, batch_size=16) == 1.0
    assert exact_match(_Oracle(tok, wrong_every=4), tok, examples, batch_size=16) == 0.75
