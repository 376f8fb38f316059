"""Synthetic tasks where depth matters, for ``scripts/plt_quality.py``: ``KeyValueRecall``
(the one calibrated on CPU, docs/benchmarks.md), ``PointerChasing`` (two recalls composed,
for a block of two layers; not yet calibrated), ``FunctionChains`` and, described here,
multi-hop variable resolution (``VariableChains``).

An example lists assignments in a random order, then asks for one variable's value::

    v7 = v2 ; v9 = 4 1 ; v2 = v9 ; v3 = v12 ; v12 = 0 8 ; ? v7 = 4 1 ;

``v7 -> v2 -> v9 -> 41`` is a chain of ``hops`` assignments; the other chains are distractors.
Every example draws new names, so nothing can be memorised: the answer must be looked up, and
each hop is a lookup whose key is the previous lookup's result.  One attention layer can do
one such lookup (find the statement whose left side is X, read its right side); composing
``hops`` of them needs a stack of layers (the "k-hop" problems: a transformer's depth must
grow with the number of hops, Sanford, Hsu and Telgarsky 2024, "Transformers, parallel
computation, and logarithmic depth").  So at equal width a model with L layers fails where one
with 2L succeeds, and a looped model has the depth of 2L with the parameters of L: the
setting where PLT's accuracy claim can be tested (``scripts/plt_quality.py``).

Files (``write_task``): a word-level ``tokenizer.json`` over the task's symbols, the training
examples as a megatron indexed dataset made by the project's own ``preprocess`` (one document
per example, so ``data.prefix=<dir>/train`` trains on it like on any corpus), and held-out
test examples (``test.jsonl``: prompt and answer) drawn from another seed.  A training
document asks for the head of every chain, in a random order (``? v7 = 4 1 ; ? v3 = 0 8 ;``):
the same lookups, ``chains`` times the answer tokens to learn from per document (the
statements themselves are random, so most of a document's loss is noise); a test prompt is
such a document cut after its first query.  The same seed
always gives the same files.  ``exact_match`` scores a model through the project's KV-cached
generator, so PLT's one-pass decode is what is scored: the first answer token comes from the
prompt's forward pass, the next ones from decode steps.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

EOD = "<|endoftext|>"
SEP, QUERY, ASSIGN = ";", "?", "="


@dataclass(frozen=True)
class VariableChains:
    hops: int = 3
    """Assignments from the queried variable to its value."""
    chains: int = 3
    """Chains per example; all but the queried one are distractors."""
    variables: int = 48
    """Distinct variable names (each example uses hops * chains of them)."""
    answer_digits: int = 2
    """Answer length in tokens (two or more: the decode steps are scored too)."""

    def __post_init__(self):
        if self.hops < 1 or self.chains < 1 or self.answer_digits < 1:
            raise ValueError(f"hops, chains and answer_digits must be >= 1: {self}")
        if self.variables < self.hops * self.chains:
            raise ValueError(f"{self.variables} variables cannot make {self.chains} chains of "
                             f"{self.hops} hops")

    @property
    def document_length(self) -> int:
        """Tokens per example, EOD included: every example has this length, so training with
        ``model.seq_length`` equal to it makes each training sequence exactly one example,
        starting at position 0 like a test prompt (megatron's GPTDataset cuts the stream of
        documents every seq_length tokens)."""
        statement = 4 * (self.hops - 1) + 3 + self.answer_digits  # per chain
        query = 3 + self.answer_digits + 1  # "? v = " answer ";"
        return self.chains * (statement + query) + 1  # EOD

    def vocabulary(self) -> list[str]:
        return [EOD, SEP, QUERY, ASSIGN] + [str(d) for d in range(10)] + \
            [f"v{i}" for i in range(self.variables)]

    def document(self, rng: random.Random) -> list[str]:
        """A training document: the statements, then every chain's head asked for."""
        prompt, answer, others = self._draw(rng)
        tokens = prompt + answer + [SEP]
        for head, value in others:
            tokens += [QUERY, head, ASSIGN, *value, SEP]
        return tokens

    def example(self, rng: random.Random) -> tuple[list[str], list[str]]:
        """(prompt tokens, answer tokens) of one test example: a document cut after its
        first query."""
        prompt, answer, _ = self._draw(rng)
        return prompt, answer

    def _draw(self, rng: random.Random):
        names = rng.sample(range(self.variables), self.hops * self.chains)
        statements, heads, values = [], [], []
        for c in range(self.chains):
            chain = [f"v{i}" for i in names[c * self.hops:(c + 1) * self.hops]]
            value = [str(rng.randrange(10)) for _ in range(self.answer_digits)]
            for left, right in zip(chain, chain[1:]):
                statements.append([left, ASSIGN, right, SEP])
            statements.append([chain[-1], ASSIGN, *value, SEP])
            heads.append(chain[0])
            values.append(value)
        rng.shuffle(statements)
        order = rng.sample(range(self.chains), self.chains)
        prompt = [t for s in statements for t in s] + [QUERY, heads[order[0]], ASSIGN]
        return prompt, values[order[0]], [(heads[c], values[c]) for c in order[1:]]


@dataclass(frozen=True)
class FunctionChains:
    """Compose ``hops`` functions: ``x f3 f0 f6 f2 f5 = v4 v5 ;`` where ``v_i`` is the value
    after the first ``i`` functions (``v_i = f_i(v_{i-1})``, ``v_0 = x``); the answer is the
    last two values.  The ``functions`` are fixed random permutations of ``values`` values,
    drawn from ``seed`` (the same for every example: a model learns their tables).

    Why depth: a layer's MLP can apply a function (or, with room, a pair: a table of
    functions^2 x values entries) to a value the attention brought in, but composing all
    ``hops`` in one layer needs a table of functions^hops x values entries, far beyond a small
    MLP; so the number of compositions a model can do grows with its depth.  The supervision
    is dense per compute (one answer per ``hops + 6`` tokens), the lookups are tables rather
    than an induction circuit, and it is learned in CPU minutes, where the variable chains
    above stayed on their loss plateau (docs/benchmarks.md)."""

    hops: int = 5
    functions: int = 8
    values: int = 8
    seed: int = 0
    answer_digits: int = 2  # v_{hops-1} and v_hops: the decode step is scored too

    def __post_init__(self):
        if self.hops < 2 or self.functions < 1 or self.values < 2:
            raise ValueError(f"need hops >= 2, functions >= 1 and values >= 2: {self}")

    def tables(self) -> list[list[int]]:
        rng = random.Random(f"functions-{self.seed}")
        return [rng.sample(range(self.values), self.values) for _ in range(self.functions)]

    @property
    def document_length(self) -> int:
        return self.hops + 6  # x, the functions, "=", two values, ";", EOD

    def vocabulary(self) -> list[str]:
        return [EOD, SEP, QUERY, ASSIGN] + [f"x{i}" for i in range(self.values)] + \
            [f"f{i}" for i in range(self.functions)]

    def _draw(self, rng: random.Random):
        tables = self.tables()
        x = rng.randrange(self.values)
        fs = [rng.randrange(self.functions) for _ in range(self.hops)]
        values = [x]
        for f in fs:
            values.append(tables[f][values[-1]])
        prompt = [f"x{x}"] + [f"f{f}" for f in fs] + [ASSIGN]
        return prompt, [f"x{v}" for v in values[-2:]]

    def document(self, rng: random.Random) -> list[str]:
        prompt, answer = self._draw(rng)
        return prompt + answer + [SEP]

    def example(self, rng: random.Random) -> tuple[list[str], list[str]]:
        return self._draw(rng)


@dataclass(frozen=True)
class KeyValueRecall:
    """Recall values by key: ``t5 t30 t2 t17 t9 t41 | t17 t9 t41 t5 t30 t2 t17 t9 t41 ;``.
    ``pairs`` keys, each followed by its two-token value (all ``3 * pairs`` tokens distinct,
    drawn from ``symbols``), a separator, then ``queries`` keys drawn with replacement, each
    followed by its value; the test asks for the value of one more key.

    Why depth: reading a key's value is an induction lookup, "find where this token occurred
    before and read the token after it".  The key it matches must carry its predecessor's
    identity, which only an earlier attention layer can write there, so one attention layer
    cannot do it (Olsson et al. 2022, "In-context learning and induction heads"; Sanford, Hsu
    and Telgarsky 2024 prove the one-layer bound for large inputs).  The queries come in
    random order and may repeat, which rules out the one-layer shortcuts of a copy task: a
    fixed offset, or "the earliest token not yet repeated", which took one layer to 0.5-0.9
    exact match there.  At this small size one layer can still brute-force the lookups
    slowly (one seed of three reached 0.5 by 3,000 steps; docs/benchmarks.md).  Both answer tokens are lookups (the second
    one's key is the first answer token), so PLT's decode step is scored as well.

    For PLT it also probes the shared K/V: a later loop's long-range attention reads loop
    1's keys of the same layer, which in a one-layer block are computed from the embeddings
    alone (docs/design/architectures.md)."""

    pairs: int = 4
    queries: int = 8
    symbols: int = 32
    answer_digits: int = 2  # the value's tokens

    def __post_init__(self):
        if self.pairs < 2 or self.queries < 1:
            raise ValueError(f"need pairs >= 2 and queries >= 1: {self}")
        if self.symbols < 3 * self.pairs:
            raise ValueError(f"{self.symbols} symbols cannot make {self.pairs} distinct "
                             "keys and values")
        if self.answer_digits != 2:
            raise ValueError(f"values are two tokens: {self}")

    @property
    def document_length(self) -> int:
        return 3 * (self.pairs + self.queries) + 3  # pairs, |, queries, ;, EOD

    def vocabulary(self) -> list[str]:
        return [EOD, SEP, QUERY, ASSIGN, "|"] + [f"t{i}" for i in range(self.symbols)]

    def _draw(self, rng: random.Random, queries: int):
        tokens = [f"t{i}" for i in rng.sample(range(self.symbols), 3 * self.pairs)]
        triples = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
        asked = [t for _ in range(queries) for t in rng.choice(triples)]
        return [t for triple in triples for t in triple] + ["|"] + asked, triples

    def document(self, rng: random.Random) -> list[str]:
        return self._draw(rng, self.queries)[0] + [SEP]

    def example(self, rng: random.Random) -> tuple[list[str], list[str]]:
        """The prompt is a document cut after the key of a query at a random place among
        the queries (the ones before it answered)."""
        tokens, triples = self._draw(rng, rng.randrange(self.queries))
        key, *value = rng.choice(triples)
        return tokens + [key], value

    @staticmethod
    def lookup_distance(prompt: list[str]) -> int:
        """Tokens from a test prompt's last position (the asked key) back to the key's
        latest earlier occurrence, whose successor holds the answer.  A model reaches that
        successor by attention only if its keys span this distance minus one; PLT's later
        loops over a one-layer block see just their own ``window`` tokens (the current one
        included), so they can answer exactly the examples with distance <= window."""
        last = len(prompt) - 1
        return last - max(i for i in range(last) if prompt[i] == prompt[-1])


@dataclass(frozen=True)
class PointerChasing:
    """Chained recall: ``a5 b2 a1 b7 | b7 c3 c9 b2 c4 c0 | a5 c4 c0 b7 c3 c9 a1`` (``hops``
    = 2).  Table 1 maps each of ``pairs`` symbols of alphabet ``a`` to one of alphabet ``b``;
    the last table maps each ``b`` to a two-token value of alphabet ``c`` (with ``hops`` = 3:
    ``a -> b -> c``, then ``c`` to values of ``d``).  Each table is shuffled on its own, and
    every token occurs once in it, as each key does in ``KeyValueRecall``.  Then
    come ``queries`` questions, each a symbol followed by the value reached from it
    (``a5 -> b2 -> c4 c0``); a question starts at any table, so it takes 1..``hops`` lookups.
    A test prompt is a document cut after an ``a`` symbol (``hops`` lookups) at a random
    place among the questions (the ones before it answered, never the same symbol: its
    earlier answer could be copied).  The alphabets tell the tables apart: a ``b`` symbol
    occurs as a target in table 1 and as a source in table 2, so "the token after it" is an
    ``a`` or its value, and the lookup wants the one of the next alphabet (with one alphabet
    for all, that took position parity, and no model learned it; docs/benchmarks.md).

    Why it needs three layers where ``KeyValueRecall`` needs two: one lookup is an induction
    (a first layer writes each token's predecessor into its position, a second finds the
    position whose predecessor is the asked symbol and reads the token there), and the
    second lookup is keyed by the first one's result, so it can only start in a third
    layer: attention reads a position's values as they were before the layer, so the second
    layer cannot read a result it is itself computing (a model with fewer layers has to
    brute-force the composition, as one layer did on the recall task).  The questions that
    start at a later table (one lookup) teach the circuit the ``hops``-lookup ones compose.
    Meant to separate vanilla models of 2 and 4 layers, so that a block of 2 layers looped
    twice (the depth of 4) tests PLT at depth.  Measured on CPU (docs/benchmarks.md): both
    depths learn the single lookup by step 2,000, and neither the composed one (at chance up
    to 9,000 steps for 4 layers): the budget where the separation shows is still to find."""

    hops: int = 2
    pairs: int = 4
    queries: int = 8
    symbols: int = 16

    def __post_init__(self):
        if not 2 <= self.hops <= 7 or self.pairs < 2 or self.queries < 1:
            raise ValueError(f"need 2 <= hops <= 7 (an alphabet per table and one for the "
                             f"values), pairs >= 2 and queries >= 1: {self}")
        if self.symbols < 2 * self.pairs:
            raise ValueError(f"{self.symbols} symbols per alphabet cannot make {self.pairs} "
                             "distinct two-token values")

    @property
    def answer_digits(self) -> int:
        return 2  # the value's tokens: the decode step is scored too

    @property
    def document_length(self) -> int:
        # the tables of pairs, the last of triples, a | after each, the questions, ;, EOD
        return 2 * self.pairs * (self.hops - 1) + 3 * self.pairs + self.hops + \
            3 * self.queries + 2

    @staticmethod
    def alphabet(level: int) -> str:
        """The letter of table ``level``'s sources (the last: the values')."""
        return "abcdefgh"[level]

    def vocabulary(self) -> list[str]:
        return [EOD, SEP, "|"] + [f"{self.alphabet(level)}{i}" for level in range(self.hops + 1)
                                  for i in range(self.symbols)]

    def _context(self, rng: random.Random):
        """The context; per table, its sources' answers (the value reached from each); and
        every source's answer in one map."""
        levels = [[f"{self.alphabet(level)}{i}" for i in rng.sample(range(self.symbols), n)]
                  for level, n in enumerate([self.pairs] * self.hops + [2 * self.pairs])]
        values = [levels[-1][2 * i:2 * i + 2] for i in range(self.pairs)]
        answers = [dict(zip(levels[-2], values))]
        context = [t for i in rng.sample(range(self.pairs), self.pairs)
                   for t in (levels[-2][i], *values[i])] + ["|"]
        for level in reversed(range(self.hops - 1)):
            answers.insert(0, {x: answers[0][y]
                               for x, y in zip(levels[level], levels[level + 1])})
            table = [t for i in rng.sample(range(self.pairs), self.pairs)
                     for t in (levels[level][i], levels[level + 1][i])] + ["|"]
            context = table + context
        return context, answers, {x: v for a in answers for x, v in a.items()}

    @staticmethod
    def _questions(rng: random.Random, answers, n: int) -> list[str]:
        """``n`` symbols to ask, each from a table drawn at random (1..hops lookups)."""
        return [rng.choice(list(rng.choice(answers))) for _ in range(n)]

    def document(self, rng: random.Random) -> list[str]:
        context, answers, lookup = self._context(rng)
        asked = self._questions(rng, answers, self.queries)
        return context + [t for x in asked for t in (x, *lookup[x])] + [SEP]

    def example(self, rng: random.Random) -> tuple[list[str], list[str]]:
        context, answers, lookup = self._context(rng)
        while True:
            before = self._questions(rng, answers, rng.randrange(self.queries))
            asked = rng.choice(list(answers[0]))  # hops lookups
            if asked not in before:
                return (context + [t for x in before for t in (x, *lookup[x])] + [asked],
                        list(lookup[asked]))


Task = VariableChains | FunctionChains | KeyValueRecall | PointerChasing


def tokenizer_for(task: Task):
    """A word-level tokenizer over exactly the task's symbols (ids in ``vocabulary`` order)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from plt_train.data.tokenizer import Tokenizer

    vocab = {t: i for i, t in enumerate(task.vocabulary())}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=SEP))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOD])
    return Tokenizer(hf)


@dataclass(frozen=True)
class TaskFiles:
    prefix: str  # data.prefix of the training examples (its tokenizer beside it)
    test: Path  # held-out examples, one JSON object per line: prompt, answer (token strings)
    tokenizer: Path


def write_task(task: Task, out_dir: str | os.PathLike, train_examples: int,
               test_examples: int, seed: int = 0) -> TaskFiles:
    """Write the task's files into ``out_dir`` (see the module docstring).  Training examples
    come from ``seed``, test examples from another stream of it, so none is shared by
    chance more than the task's size allows."""
    from plt_train.data.preprocess import preprocess

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(task)
    prefix = out / "train"
    tok.save(f"{prefix}.tokenizer.json")
    rng = random.Random(f"train-{seed}")
    docs = out / "train.jsonl"
    with open(docs, "w") as f:
        for _ in range(train_examples):
            f.write(json.dumps({"text": " ".join(task.document(rng))}) + "\n")
    preprocess([str(docs)], tok, str(prefix))
    docs.unlink()
    rng = random.Random(f"test-{seed}")
    test = out / "test.jsonl"
    with open(test, "w") as f:
        for _ in range(test_examples):
            prompt, answer = task.example(rng)
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    (out / "task.json").write_text(json.dumps({"task": asdict(task), "seed": seed,
                                               "train_examples": train_examples,
                                               "test_examples": test_examples}, indent=1))
    return TaskFiles(str(prefix), test, Path(f"{prefix}.tokenizer.json"))


def read_test(path: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return [(r["prompt"], r["answer"]) for r in rows]


def exact_match(generator, tokenizer, examples, batch_size: int = 64) -> float:
    """The fraction of ``examples`` whose whole answer the model generates greedily (through
    ``inference.Generator``: PLT's one-pass decode for PLT models)."""
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [[tokenizer.hf.token_to_id(t) for t in p] for p, _ in chunk]
        width = max(len(a) for _, a in chunk)
        out = generator.generate(prompts, width, temperature=0.0)
        for (_, answer), got in zip(chunk, out.tokens):
            correct += [tokenizer.hf.id_to_token(t) for t in got[:len(answer)]] == answer
    return correct / len(examples)
