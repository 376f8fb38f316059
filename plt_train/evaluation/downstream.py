"""Running the harness: ``evaluate`` (plt-eval's and the hook's core) and ``DownstreamHook``,
the evaluation inside training every ``downstream.interval`` steps.

The hook evaluates the live model, between optimizer steps, in eval mode and without
gradients, then puts it back in training mode; results go to the console, ``metrics.jsonl``
(kind ``downstream``) and wandb (``downstream/<task>/<metric>``).  Layouts where every rank
holds whole layers (TP = PP = 1; validation refuses others before anything starts: those
runs evaluate their checkpoints with ``plt-eval``, which loads any layout into one process):
- data parallel only: the requests are sharded over the data-parallel ranks (the harness's
  strided split, padded to equal counts) and the metrics gathered to rank 0;
- expert parallel: MoE layers exchange tokens inside the forward, so every rank must run the
  same forwards in lockstep: each evaluates every request (identical inputs and weights give
  identical work).
Rank 0's results are broadcast, and the logging rank (the last) logs them.
"""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from typing import Optional

from plt_train.evaluation.tasks import ResolvedTasks, resolve


def evaluate(lm, tasks: ResolvedTasks, limit: Optional[float] = None,
             num_fewshot: Optional[int] = None, log_samples: bool = False,
             seed: int = 1234) -> Optional[dict]:
    """``lm_eval.simple_evaluate`` of ``lm`` (a ``PltLM``) on ``tasks`` (``tasks.resolve``'s):
    the harness's results dict on rank 0 of its group, None on the others.  ``limit``:
    documents per task (a fraction when < 1).  ``seed`` seeds the harness's sampling of
    few-shot examples."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks.specs, task_manager=tasks.manager,
                           limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def flat_metrics(results: dict) -> dict:
    """The harness's ``results`` section as ``{"<task>/<metric>": value}``: the numbers to log.
    A metric under a filter other than the default one keeps the filter's name
    (``exact_match@strict-match``); standard errors and document counts are left out (they
    are in the JSON)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key in ("alias", "sample_len") or metric.endswith("_stderr") or \
                    not isinstance(value, (int, float)):
                continue
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"@{filt}")] = value
    return out


def check_tasks(cfg) -> Optional[ResolvedTasks]:
    """``downstream.tasks`` (a ``DownstreamConfig``) resolved, for ``DownstreamHook``; None
    when the evaluation is off.  ConfigError for a name the harness does not know, or when
    the harness is not installed; called before any process group starts."""
    from plt_train.config import ConfigError

    if not (cfg.tasks and cfg.interval):
        return None
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("downstream.tasks", "lm-evaluation-harness is not installed",
                          "pip install -e '.[eval]', or downstream.tasks=[]") from None
    from plt_train.evaluation.tasks import TaskError

    try:
        return resolve(cfg.tasks)
    except TaskError as err:
        raise ConfigError("downstream.tasks", str(err), "fix the name") from None


@contextmanager
def quiet_harness():
    """No progress bars or INFO lines from the harness inside a training log (its warnings
    stay).  The harness logs every task's set-up at INFO, ``datasets`` draws a bar when it
    first reads a task's file, and ``Task.build_all_requests`` draws one per task with no way
    to turn it off (lm_eval 0.4.13), so its module's ``tqdm`` is swapped for a silent one for
    the duration; our own bars are off through ``PltLM(quiet=True)``."""
    import datasets
    import lm_eval.api.task as harness_task

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    original = harness_task.tqdm
    harness_task.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        harness_task.tqdm = original
        if bars:
            datasets.enable_progress_bars()


@contextmanager
def rng_kept():
    """The harness seeds Python's, NumPy's and torch's global generators (CUDA's too) for its
    few-shot sampling; training's are put back after it, so a run with the evaluation trains
    exactly as one without (dropout masks included: tests/evaluation/test_harness.py)."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class DownstreamHook:
    """``downstream.tasks`` (``tasks``: as ``check_tasks`` resolved them) on the live model
    every ``downstream.interval`` steps and at the last step.  ``chunks``: the training model
    (one chunk: TP = PP = 1); ``model_cfg``: its config (a gpt model is evaluated through its
    vanilla twin, as the sampler does)."""

    def __init__(self, cfg, tasks: ResolvedTasks, chunks, model_cfg, tokenizer, seed: int):
        self.cfg, self.tasks, self.chunks, self.model_cfg = cfg, tasks, chunks, model_cfg
        self.tokenizer, self.seed = tokenizer, seed

    def due(self, step: int, last_step: int) -> bool:
        return step % self.cfg.interval == 0 or step == last_step

    def run(self) -> dict:
        """{"<task>/<metric>": value, "seconds": wall time}, on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from plt_train.evaluation.harness import PltLM
        from plt_train.inference.generator import as_decoder

        start = time.perf_counter()
        trained = getattr(self.chunks[0], "module", self.chunks[0])  # inside DDP
        model = as_decoder(trained, self.model_cfg)
        shard = ps.get_expert_model_parallel_world_size() == 1
        group = ps.get_data_parallel_group() if shard else None
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if shard else (0, 1)
        lm = PltLM(model, self.tokenizer, max_length=self.model_cfg.seq_length,
                   batch_size=self.cfg.batch_size, rank=rank, world_size=world, group=group,
                   quiet=True)
        try:
            with quiet_harness(), rng_kept():
                results = evaluate(lm, self.tasks, limit=self.cfg.limit,
                                   num_fewshot=self.cfg.num_fewshot, seed=self.seed)
        finally:
            trained.train()
        # The harness answers on global rank 0; the logging rank is the last one (Megatron's).
        box = [flat_metrics(results) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return {**box[0], "seconds": round(time.perf_counter() - start, 3)}
