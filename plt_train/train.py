"""Pretraining entry point: ``torchrun ... -m plt_train.train [hydra overrides]``.

Reads top to bottom: configure -> validate -> start processes -> data -> model -> optimizer
-> resume -> loop (train step, log, validate, downstream tasks, checkpoint) -> final
checkpoint.  Everything architecture-specific lives behind the model family
(``plt_train.models``: its checks and ``prepare_for_training``, which hands back a
``TrainingModel``).
"""
from __future__ import annotations

import os
import sys
import time

import hydra
import torch
from omegaconf import OmegaConf

from plt_train.config import ConfigError, RunConfig, derived_data_parallel
from plt_train.config.store import CONFIG_DIR, hydra_argv_for_rank, register_configs


def run(cfg: RunConfig, run_dir: str) -> dict:
    """Train according to ``cfg``; returns the final metrics (on every rank)."""
    from plt_train.data import (
        build_data_iterator, build_datasets, check_data, mixture_proportions, prepare_data,
    )
    from plt_train.data.stats import unigram_entropy
    from plt_train.evaluation.downstream import DownstreamHook, check_tasks
    from plt_train.models import get_family, validate
    from plt_train.models.parallelize import gather_params
    from plt_train.runtime import detect_device, init_distributed, is_logging_rank, say, set_seed
    from plt_train.runtime.device import resolve_dtype
    from plt_train.runtime.hangs import StackDumpOnSignal, flight_recorder_env
    from plt_train.training.checkpoint import (
        checkpoint_dir, latest_checkpoint, resolve_load, resume,
    )
    from plt_train.training.guard import DivergenceGuard, TrainingDiverged, weights_are_finite
    from plt_train.training.integrity import run_identity
    from plt_train.training.loggers import MetricLoggers
    from plt_train.training.metrics import ThroughputMeter, peak_flops_per_second
    from plt_train.training.optim import build_optimizer, build_scheduler
    from plt_train.training.saver import CheckpointSaver
    from plt_train.training.signals import STOP_SIGNALS, FaultInjector, PreemptionHandler
    from plt_train.training.step import broadcast_from_last_rank, evaluate, train_step

    # 1. Fail fast, before any process group exists.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    check_data(cfg.data, cfg.model.vocab_size)
    downstream_tasks = check_tasks(cfg.downstream)  # None: no downstream evaluation
    if cfg.checkpoint.load:
        resolve_load(cfg.checkpoint.load)  # a missing or wrong path: one line, now
    t, p = cfg.train, cfg.parallel
    dp = derived_data_parallel(cfg, world)
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)

    # 2. Processes (every collective times out after parallel.timeout_s, and the flight
    # recorder keeps each rank's last collectives: runtime/hangs.py), seeds, data.
    device = detect_device()
    flight_recorder_env(run_dir)
    dims = init_distributed(device, tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert,
                            timeout_s=p.timeout_s)
    set_seed(t.seed)
    prepared = prepare_data(cfg.data)
    dtype = resolve_dtype(t.precision, device)

    # 3. Model (DDP-wrapped chunks, the schedule's stages, FLOPs, metric sources), optimizer,
    # schedule.
    model = get_family(cfg.model.name).prepare_for_training(
        cfg, prepared.tokenizer.vocab_size, dtype, device)
    chunks = model.chunks
    optimizer = build_optimizer(chunks, cfg.optim, p, dtype)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)

    # 4. Resume (model, optimizer, schedule, data position, RNG) from the newest checkpoint
    # that verifies (checksums, finite weights) and belongs to this model and tokenizer.
    ckpt_dir = checkpoint_dir(cfg, run_dir)
    identity = run_identity(cfg.model, prepared.tokenizer)
    state, resumed_from = resume(cfg.checkpoint, ckpt_dir, chunks, optimizer, scheduler,
                                 identity, device.device)
    if state.step >= t.steps:  # a finished run launched again: say so instead of a no-op
        if is_logging_rank():
            say(f"[plt_train] {resumed_from} is at step {state.step}, train.steps="
                f"{t.steps}: nothing to train (raise train.steps to continue this run, or "
                "give a new run another name)")
        return {"step": state.step, "nothing_to_do": True}

    # 5. Data iterators at the saved position; validation always reads the same batches.
    # Every validation reads the same first ``eval_iters`` global batches, so that many samples
    # are all it needs.  Asking for more (one set per evaluation, as Megatron-LM does, whose
    # evaluations move on through the split) would make the validation set depend on
    # train.steps: a split smaller than the request is repeated over epochs, and megatron's
    # shuffle depends on the number of epochs, so runs of different lengths (equal-time
    # comparisons) would be scored on different batches.
    seq = cfg.model.seq_length
    train_ds, valid_ds = build_datasets(
        prepared, seq, cfg.data.split, t.seed,
        (t.steps * t.global_batch_size, t.eval_iters * t.global_batch_size),
        os.path.join(run_dir, "data_cache"))
    train_iter = build_data_iterator(train_ds, state.consumed_samples, t.micro_batch_size,
                                     dims.dp_rank, dp, cfg.data.num_workers)

    downstream = None  # lm-eval tasks on the live model
    if downstream_tasks is not None:
        downstream = DownstreamHook(cfg.downstream, downstream_tasks, chunks, cfg.model,
                                    prepared.tokenizer, t.seed)

    def validation_loss() -> float:
        it = build_data_iterator(valid_ds, 0, t.micro_batch_size, dims.dp_rank, dp, 0)
        loss = evaluate(model, it, t.eval_iters, num_microbatches, seq, t.micro_batch_size,
                        device.device)
        return broadcast_from_last_rank(loss)

    # 6. Metrics.
    peak, peak_source = peak_flops_per_second(device.device, dtype, cfg.logging.peak_tflops)
    meter = ThroughputMeter(t.steps, peak, num_devices=dims.world)
    logging_rank = is_logging_rank()
    loggers = MetricLoggers.create(cfg.logging, run_dir, OmegaConf.to_container(
        OmegaConf.structured(cfg)), t.steps, enabled=logging_rank, name=cfg.name)
    if logging_rank:
        from plt_train.runtime.quiet import accelerators_line

        say(f"[plt_train] {accelerators_line()}")
        n_params = sum(p_.numel() for c in chunks for p_ in c.parameters())
        say(f"[plt_train] {dims} dtype={dtype} micro-batches/step={num_microbatches} "
            f"params(this rank)={n_params:,} peak={peak / 1e12:.1f} TFLOP/s ({peak_source}) "
            f"start step={state.step}")
        if cfg.model.compile:
            from plt_train.models.compile import compiled_layers
            say(f"[plt_train] model.compile: {compiled_layers(chunks)} transformer layer(s) "
                "compiled with torch.compile")
        if p.overlap_grad_reduce:
            buckets = sum(len(c.bucket_groups) + len(c.expert_parallel_bucket_groups)
                          for c in chunks)
            say(f"[plt_train] gradient reduce overlapped with the backward pass: {buckets} "
                "bucket(s)")
        if prepared.mixture:
            shares = ", ".join(f"{prefix} {share:.3f} (weight {weight:.3f})" for (prefix, share),
                               (_, weight) in zip(mixture_proportions(train_ds), prepared.mixture))
            say(f"[plt_train] data mixture, realised shares of the {len(train_ds)} training "
                f"samples: {shares}")
        else:
            say(f"[plt_train] unigram entropy of the corpus: "
                f"{unigram_entropy(prepared.prefix):.4f} nats/token (the loss of a model that "
                "ignores context)")

    # 7. The loop.  The signal handlers and the loggers are released also when it fails
    # (Hydra's multirun goes on to its next job in this process).  A stop signal also dumps
    # every thread's stack to <run_dir>/stacks_rank<R>.log: torchrun stops the other workers
    # with SIGTERM when one fails, so a rank stuck in a hang says where it was.
    saver = CheckpointSaver(ckpt_dir, cfg.checkpoint, identity, resumed_from, logging_rank)
    preemption = PreemptionHandler()
    stacks = StackDumpOnSignal(run_dir, dims.rank, STOP_SIGNALS)
    fault = FaultInjector.from_env()
    tokens_per_step = t.global_batch_size * seq
    guard = DivergenceGuard(t.max_skipped_steps, t.spike_window, t.spike_zscore)
    last = {}
    phase = "the training loop"  # what was running, named in the error of a failed collective
    try:
        while state.step < t.steps:
            phase = f"step {state.step + 1}"
            fault.before_step(state.step + 1, dims.rank, chunks)
            start = time.perf_counter()
            out = train_step(model, optimizer, scheduler, train_iter, num_microbatches, seq,
                             t.micro_batch_size, device.device)
            state.step += 1
            state.consumed_samples += t.global_batch_size
            loss = out["loss"]
            elapsed = time.perf_counter() - start
            last = {"loss": loss, "lr": out["lr"], "grad_norm": out["grad_norm"],
                    "step_ms": 1e3 * elapsed,  # this step's wall time (Megatron's ms/iteration)
                    **meter.update(state.step, tokens_per_step,
                                   model.flops.training * t.global_batch_size, elapsed),
                    **out.get("extra", {})}  # model-provided metrics (MoE aux losses, a2a bytes)
            notes = guard.check(state.step, loss, out["grad_norm"], out["skipped"])
            if guard.skipped_total:
                last["skipped_steps"] = guard.skipped_total
            if state.step % t.log_interval == 0 or state.step == t.steps or notes:
                loggers.log(state.step, last)
            for note in notes if logging_rank else ():
                say(f"[plt_train] {note}")
            saver.poll()  # commit a background save whose writes have ended
            if guard.diverged:
                saver.finish()
                raise guard.error(state.step, latest_checkpoint(ckpt_dir))
            if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
                phase = f"the validation at step {state.step}"
                last["val_loss"] = validation_loss()
                loggers.log(state.step, {"loss": last["val_loss"]}, kind="valid")
            if downstream is not None and downstream.due(state.step, t.steps):
                phase = f"the downstream evaluation at step {state.step}"
                gather_params(chunks)  # overlap_param_gather leaves other ranks' shards stale
                loggers.log(state.step, downstream.run(), kind="downstream")
            fault.after_step(state.step, dims.rank)
            stop = preemption.should_stop(device.device if device.is_cuda else torch.device("cpu"))
            interval = cfg.checkpoint.save_interval
            if stop or (interval and state.step % interval == 0) or (
                    state.step == t.steps and cfg.checkpoint.save_at_end):
                gather_params(chunks)  # overlap_param_gather leaves other ranks' shards stale
                if not weights_are_finite(chunks, device.device):  # never save a broken model
                    saver.finish()
                    raise TrainingDiverged(
                        f"the weights are not finite at step {state.step}: not saved (the last "
                        f"good checkpoint is {latest_checkpoint(ckpt_dir)})")
                phase = f"the save of step {state.step}"
                saver.save(chunks, optimizer, scheduler, state,
                           kill_first_writer=fault.kills_writer(state.step, dims.rank),
                           before_commit=lambda _, s=state.step: fault.before_commit(s, dims.rank))
            if stop:
                saver.finish()
                if logging_rank:
                    say(f"[plt_train] signal received: checkpointed step {state.step}, exiting")
                break
        phase = "the last save"
        saver.finish()
    except Exception as err:
        err.add_note(f"plt_train phase: {phase}")
        raise
    finally:
        stacks.close()
        preemption.restore()
        loggers.close()
    if cfg.sample.prompt and state.step >= t.steps:
        from plt_train.inference import sample_after_training
        gather_params(chunks)
        text = sample_after_training(model.modules, prepared.tokenizer, cfg.sample, cfg.model)
        if logging_rank:
            say(f"[plt_train] sample: {cfg.sample.prompt!r} -> {text!r}" if text is not None
                else "[plt_train] sample: needs TP=PP=1 (use plt-generate)")
        last["sample"] = text
    return {"step": state.step, **last}


def _main(hydra_cfg) -> dict | None:
    from plt_train.runtime.quiet import quiet_start

    quiet_start()  # before megatron-core is imported: one line instead of its warnings
    from hydra.core.hydra_config import HydraConfig

    from plt_train.data import DataError
    from plt_train.runtime import destroy_distributed, say
    from plt_train.runtime.launch_env import set_torch_env_from_slurm
    from plt_train.training.checkpoint import checkpoint_dir
    from plt_train.training.guard import TrainingDiverged
    from plt_train.training.integrity import CheckpointError, WriterLock

    set_torch_env_from_slurm()  # started by srun / submitit rather than torchrun
    cfg: RunConfig = OmegaConf.to_object(hydra_cfg)
    run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    lock = None
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # one run per checkpoint directory
            lock = WriterLock(checkpoint_dir(cfg, run_dir))
        return run(cfg, run_dir)  # a sweep's launcher collects it (final loss, step, ...)
    except (ConfigError, DataError, TrainingDiverged, CheckpointError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            say(f"plt-train: {err}", sys.stderr)
        else:  # torchrun stops every worker once one exits: let rank 0 say why first
            time.sleep(5)
        # 2: a bad config or dataset, 3: the run diverged, 4: no usable or writable checkpoint
        sys.exit(3 if isinstance(err, TrainingDiverged) else
                 4 if isinstance(err, CheckpointError) else 2)
    except Exception as err:  # anything else: one line here, the whole traceback in a file
        path = _save_traceback(run_dir, err)
        failure = _communication_failure(err, cfg, run_dir, path)
        if failure is not None:
            rank, (how, line) = int(os.environ.get("RANK", "0")), failure
            if how == "timed out" or rank == 0:  # a lost peer follows another rank's failure
                say(f"plt-train: {line}", sys.stderr)
            sys.exit(5)
        if int(os.environ.get("RANK", "0")) == 0:
            say(f"plt-train: {_one_line(err)}; each failed rank's traceback is in "
                f"{path.parent}/error_rank*.log", sys.stderr)
        else:
            time.sleep(5)
        sys.exit(1)
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()


def _communication_failure(err: BaseException, cfg: RunConfig, run_dir: str, traceback_file):
    """``(how, one line)`` when ``err`` is a collective that timed out or lost its peer, after
    dumping this rank's flight recorder; else None."""
    from plt_train.runtime.hangs import communication_failure, dump_flight_recorder

    how = communication_failure(err)
    if how is None:
        return None
    rank = int(os.environ.get("RANK", "0"))
    notes = [n.removeprefix("plt_train phase: ") for n in getattr(err, "__notes__", [])
             if n.startswith("plt_train phase: ")]
    during = f" during {notes[0]}" if notes else ""
    recorder = dump_flight_recorder(run_dir, rank)
    where = (f"; flight recorder in {recorder.parent} (python -m torch.distributed."
             f"flight_recorder.fr_trace {recorder.parent} -p rank_)") if recorder else ""
    if how == "timed out":
        line = (f"rank {rank}: a collective timed out after {cfg.parallel.timeout_s:g} s "
                f"(parallel.timeout_s){during}: another rank stopped or is far slower; a stuck "
                f"rank's stacks are in {run_dir}/stacks_rank*.log{where}")
    else:
        line = (f"rank {rank} lost its connection to another rank{during}: that rank failed "
                f"or was killed (see its error in {traceback_file.parent}/error_rank*.log or "
                "the launcher's log)")
    return how, line


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message (at file:line in function)``: what and where."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "plt_train" in f.filename] or frames
    where = f" (at {os.path.basename(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name})" \
        if ours else ""
    message = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {message}{where}"


def _save_traceback(run_dir: str, err: BaseException):
    """Write this rank's full traceback to ``<run_dir>/error_rank<R>.log``; returns the path."""
    import traceback
    from pathlib import Path

    path = Path(run_dir) / f"error_rank{os.environ.get('RANK', '0')}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
    except OSError:  # no run directory (a full disk, a read-only path): say so on stderr
        traceback.print_exception(err)
    return path


def main() -> None:
    register_configs()
    sys.argv = [sys.argv[0]] + hydra_argv_for_rank(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_main)()


if __name__ == "__main__":
    main()
