"""lm-evaluation-harness's ``LM`` over our models: ``PltLM(model, tokenizer)``.

The three request types of the harness, each on our own inference path:
- ``loglikelihood`` (multiple choice): the generator's prefill over left-padded batches, the
  training-style forward with positions counted from each sequence's start, so a row's
  log-probabilities do not depend on its batch (``tests/evaluation`` checks them against the
  plain forward of each sequence alone);
- ``loglikelihood_rolling`` (perplexity tasks): the harness's disjoint rolling windows of
  ``max_length`` tokens, scored the same way;
- ``generate_until``: ``inference.Generator.generate``, so a PLT model is evaluated through its
  one-pass decode (all loops of a step in one batched pass, loop 1's shared KV cache), the
  thing its accuracy claim is about.  Greedy unless the task asks to sample; the text is cut
  at the first stop sequence.

Documents are separated by the tokenizer's end-of-document token in training, so it is also
the harness's ``eot_token_id`` and the context of an empty prompt (there is no BOS).

Data parallel: ``rank`` / ``world_size`` / ``group`` shard the requests the harness's way
(each rank a strided share, padded to equal counts, metrics gathered to rank 0).  Only for
models whose forward has no collective: with expert parallelism every rank must run the
same forwards in lockstep, so the caller gives each rank everything (``downstream.py``).
"""
from __future__ import annotations

import json
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from plt_train.inference import Generator


class PltLM(TemplateLM):
    """A one-process (TP = PP = 1) model chunk of any family as a harness model.

    ``max_length``: the longest sequence scored or generated (the model's ``seq_length``,
    what it was trained on); longer contexts keep their last tokens.  ``batch_size``:
    sequences per forward.  ``max_gen_toks``: generated tokens when a task does not say.
    ``quiet``: no progress bars (the in-training hook).  ``cuda_graph``: the generator's
    decode steps (``Generator``; off inside training, where a capture could clash with the
    NCCL watchdog).  ``rank`` / ``world_size`` / ``group``: the data-parallel sharding."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256, rank: int = 0, world_size: int = 1, group=None,
                 quiet: bool = False, cuda_graph: str = "off"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generator = Generator(model, cuda_graph=cuda_graph)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._rank, self._world_size, self._group = rank, world_size, group
        self._device = self.generator.device
        self.quiet = quiet

    # -- what the harness asks of a model -------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return f"plt_train-{self.tokenizer.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> list[int]:
        return self.tokenizer.tokenize(string)  # no BOS: nothing to add

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.detokenize(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(key, context ids, continuation ids)] -> [(sum of log p(continuation), greedy?)],
        longest first in batches (so padding is small), answered in the given order."""
        out: list = [None] * len(requests)
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(requests), desc="loglikelihood",
                   disable=disable_tqdm or self.quiet)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # The model sees context + continuation but the last token, cut to max_length.
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1]
                      for i in batch]
            logits, _ = self.generator.logits(inputs)  # left-padded: each row ends at T0
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                key, _, continuation = requests[i]
                n = len(continuation)
                scores = logprobs[row, logits.shape[1] - n:]  # the positions predicting it
                target = torch.tensor(continuation, device=scores.device)
                answer = (float(scores.gather(-1, target[:, None]).sum()),
                          bool((scores.argmax(-1) == target).all()))
                out[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole text's log-likelihood, over disjoint windows of ``max_length`` tokens
        (the first conditioned on ``eot_token_id``), as the harness's HF model does."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling",
                        disable=disable_tqdm or self.quiet):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context with the KV-cached generator (one pass per token for PLT),
        batching requests that share their generation arguments."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until",
                   disable=disable_tqdm or self.quiet)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(self.tok_decode([self.eot_token_id]))
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) \
                if kwargs.pop("do_sample", False) else 0.0
            top_p = float(kwargs.pop("top_p", 1.0))
            if max_new > self.max_length // 2:  # e.g. the harness's default 256 on a short model
                warnings.warn(f"max_gen_toks={max_new} leaves little of max_length="
                              f"{self.max_length} for the context: generating "
                              f"{self.max_length // 2} tokens")
                max_new = self.max_length // 2
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])
                           [-(self.max_length - max_new):] for i in batch]
                gen = self.generator.generate(prompts, max_new, temperature, top_p,
                                              eos_id=self.eot_token_id)
                for i, tokens in zip(batch, gen.tokens):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        text = text.split(stop, 1)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    # -- data parallel: the harness's hooks, over a torch.distributed group ---------------
    def all_gather(self, tensor):
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=self._group)
        return torch.stack(parts)

    def gather_object(self, obj, dst=0):
        import torch.distributed as dist

        parts = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, parts, group=self._group, group_dst=dst)
        return parts

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._group)
