"""Generate text from a trained run: ``plt-generate RUN_DIR --prompt "def main(" ...``.

Reads the run's config (``RUN_DIR/.hydra/config.yaml``), rebuilds its model on one process
(whatever layout it was trained with: distributed checkpoints reshard), loads the latest
checkpoint's weights and decodes with ``inference.Generator``: KV-cached, and for PLT one
batched pass per new token.  Several ``--prompt`` values form one left-padded batch.
``--cuda-graph`` (auto: on for CUDA with dense MLPs) replays each decode step from a CUDA
graph; ``--kernel`` overrides the run's ``model.loop.kernel`` (PLT's attention kernels).

Python API: ``load_for_generation(run_dir, cuda_graph=..., kernel=...) -> (generator,
tokenizer)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple


class GenerateError(ValueError):
    """A bad argument or run directory; the message is one line for the user."""


class Trained(NamedTuple):
    chunk: object  # the model, one chunk holding every layer
    cfg: object  # the run's RunConfig
    tokenizer: object
    checkpoint: Path  # the step directory its weights came from


def load_trained(run_dir: str | os.PathLike, checkpoint: str | None = None,
                 model_for=None, before_build=None) -> Trained:
    """(model chunk, RunConfig, Tokenizer, checkpoint) of a run directory's latest (or the
    given) checkpoint, in this process, whatever layout it was trained with (distributed
    checkpoints reshard); starts a one-process group if needed.  ``model_for(ModelConfig)``
    may replace the model config that is built (same weights); ``before_build(ModelConfig)``
    may refuse it (raising) before anything is loaded."""
    from omegaconf import OmegaConf

    from plt_train.config import RunConfig
    from plt_train.config.schema import ParallelConfig
    from plt_train.data import prepare_data
    from plt_train.models import build_model
    from plt_train.runtime import detect_device, init_distributed
    from plt_train.runtime.device import megatron_device_kwargs, resolve_dtype
    from plt_train.training.checkpoint import (
        latest_checkpoint, load_model_weights, resolve_load,
    )

    run_dir = Path(run_dir)
    saved_config = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise GenerateError(f"run directory {run_dir} does not exist")
    if not saved_config.is_file():
        raise GenerateError(f"{run_dir} is not a run directory (no .hydra/config.yaml): give "
                            "the run_dir a training run wrote")
    saved = OmegaConf.load(saved_config)
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))
    if before_build is not None:
        before_build(cfg.model)
    model = model_for(cfg.model) if model_for is not None else cfg.model
    ckpt = resolve_load(checkpoint) if checkpoint else \
        latest_checkpoint(cfg.checkpoint.dir or run_dir / "checkpoints")
    if not ckpt:
        raise GenerateError(f"no checkpoint under {run_dir} (the run saved none: "
                            "checkpoint.save_at_end or checkpoint.save_interval)")
    from megatron.core import parallel_state as ps

    device = detect_device()
    if not ps.model_parallel_is_initialized():
        init_distributed(device)
    tokenizer = prepare_data(cfg.data).tokenizer
    dtype = resolve_dtype(cfg.train.precision, device)
    chunks, _, _ = build_model(model, ParallelConfig(), tokenizer.vocab_size, dtype,
                               megatron_device_kwargs(device), cfg.train.seed, device.device)
    load_model_weights(ckpt, chunks)
    return Trained(chunks[0], cfg, tokenizer, Path(ckpt))


def load_for_generation(run_dir: str | os.PathLike, checkpoint: str | None = None,
                        cuda_graph: str = "auto", kernel: str | None = None):
    """(Generator, Tokenizer) for a run directory; starts a one-process group if needed.
    ``kernel`` (auto | triton | torch) replaces the saved ``model.loop.kernel``."""
    from plt_train.inference import Generator, decoding_config

    def model_for(model):
        model = decoding_config(model)  # gpt: its vanilla twin, the same weights
        if kernel is not None:
            model.loop.kernel = kernel
        return model

    chunk, cfg, tokenizer, _ = load_trained(run_dir, checkpoint, model_for=model_for)
    generator = Generator(chunk, cuda_graph=cuda_graph)
    generator.trained_as = cfg.model.name
    return generator, tokenizer


def main(argv=None) -> None:
    from plt_train.config.schema import KernelChoice, Switch

    ap = argparse.ArgumentParser(prog="plt-generate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="a step directory (default: latest)")
    ap.add_argument("--cuda-graph", default="auto", choices=[c.value for c in Switch],
                    help="replay each decode step from a CUDA graph (auto: on for CUDA "
                         "unless the model has MoE layers, whose routing syncs with the host)")
    ap.add_argument("--kernel", default=None, choices=[c.value for c in KernelChoice],
                    help="model.loop.kernel (default: the run's)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if any(not p for p in args.prompt):
        ap.error("--prompt is empty: give at least one character")
    from plt_train.config import ConfigError
    from plt_train.runtime.quiet import quiet_start
    from plt_train.training.integrity import CheckpointError

    quiet_start()
    try:
        generator, tokenizer = load_for_generation(args.run_dir, args.checkpoint,
                                                   args.cuda_graph, args.kernel)
    except (GenerateError, ConfigError, CheckpointError) as err:
        print(f"plt-generate: {err}", file=sys.stderr)
        sys.exit(2)
    prompts = [tokenizer.tokenize(p) for p in args.prompt]
    start = time.perf_counter()
    out = generator.generate(prompts, args.max_new_tokens, args.temperature, args.top_p,
                             args.seed, eos_id=tokenizer.eod)
    seconds = time.perf_counter() - start
    for prompt, new in zip(args.prompt, out.tokens):
        print(f"{prompt}\u2502{tokenizer.detokenize(new)}")
        print("-" * 40)
    n = sum(len(t) for t in out.tokens)
    kind = generator.kind if generator.trained_as == generator.kind else \
        f"{generator.trained_as} (decoded as {generator.kind})"
    print(f"[plt-generate] {kind} loops={generator.loops}: {n} tokens in "
          f"{seconds:.2f} s, KV cache {out.kv_bytes / 2**20:.2f} MiB, decode steps "
          f"{generator.step_mode}", file=sys.stderr)


if __name__ == "__main__":
    main()
