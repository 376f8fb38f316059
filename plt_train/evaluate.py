"""Evaluate a trained run with lm-evaluation-harness: ``plt-eval RUN_DIR --tasks plt_tiny_mc``.

Loads the run's latest (or ``--checkpoint``'s) weights into one process, whatever layout it
was trained with (distributed checkpoints reshard, as for plt-generate), and runs the tasks
through ``PltLM``: multiple choice by log-likelihood, generation through our KV-cached
generator (PLT: one batched pass per token).  Prints the harness's table and writes its
results JSON (default ``RUN_DIR/eval/<step>.json``).

Tasks: the shipped ``plt_tiny_mc`` / ``plt_tiny_gen``, YAML tasks under ``--include-path``,
or the harness's own (``hellaswag``, ``arc_easy``, ``piqa``, ...: their data comes from the
Hugging Face Hub, so on a machine with network access, or with ``HF_DATASETS_OFFLINE=1`` and
the datasets already in its cache).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="plt-eval", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tasks", type=_tasks, required=True,
                    help="comma-separated task, group or tag names")
    ap.add_argument("--limit", type=float, default=None,
                    help="documents per task (a fraction of each when < 1)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    ap.add_argument("--max-length", type=int, default=None,
                    help="longest sequence scored or generated (default: model.seq_length)")
    ap.add_argument("--include-path", action="append", default=None,
                    help="a folder of your own YAML tasks (repeatable)")
    ap.add_argument("--checkpoint", default=None, help="a step directory (default: latest)")
    ap.add_argument("--output", default=None,
                    help="results JSON (default: RUN_DIR/eval/<checkpoint step>.json)")
    ap.add_argument("--log-samples", action="store_true",
                    help="keep every document's inputs, outputs and scores in the JSON")
    ap.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                    help="generation tasks: replay each decode step from a CUDA graph (auto: "
                         "on for CUDA unless the model has MoE layers)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        ap.error(f"--limit must be > 0, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        ap.error(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if not args.tasks:
        ap.error("--tasks is empty")

    from plt_train.runtime.quiet import quiet_start

    quiet_start()
    from plt_train.config import ConfigError
    from plt_train.evaluation.tasks import TaskError, resolve
    from plt_train.generate import GenerateError, load_trained
    from plt_train.inference import decoding_config
    from plt_train.training.integrity import CheckpointError

    try:
        tasks = resolve(args.tasks, args.include_path)  # before the model is loaded
        chunk, cfg, tokenizer, checkpoint = load_trained(args.run_dir, args.checkpoint,
                                                         model_for=decoding_config)
    except (TaskError, GenerateError, ConfigError, CheckpointError) as err:
        print(f"plt-eval: {err}", file=sys.stderr)
        sys.exit(2)
    max_length = args.max_length or cfg.model.seq_length
    if not 1 < max_length <= cfg.model.seq_length:
        print(f"plt-eval: --max-length must be in [2, model.seq_length={cfg.model.seq_length}]"
              f", got {max_length}", file=sys.stderr)
        sys.exit(2)

    from lm_eval.utils import handle_non_serializable, make_table

    from plt_train.evaluation.downstream import evaluate, flat_metrics
    from plt_train.evaluation.harness import PltLM

    lm = PltLM(chunk, tokenizer, max_length=max_length, batch_size=args.batch_size,
               cuda_graph=args.cuda_graph)
    start = time.perf_counter()
    results = evaluate(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       log_samples=args.log_samples, seed=args.seed)
    seconds = time.perf_counter() - start
    results["plt_train"] = {"run_dir": str(Path(args.run_dir).resolve()),
                            "checkpoint": str(checkpoint), "model": cfg.model.name,
                            "loops": cfg.model.loops, "max_length": max_length,
                            "seconds": round(seconds, 3), "metrics": flat_metrics(results)}
    output = Path(args.output) if args.output else \
        Path(args.run_dir) / "eval" / f"{checkpoint.name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    print(make_table(results))
    print(f"[plt-eval] {cfg.model.name} loops={cfg.model.loops}, {checkpoint.name}: "
          f"{', '.join(args.tasks)} in {seconds:.1f} s; results in {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
