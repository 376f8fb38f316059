"""One optimizer step and one validation pass, through megatron-core's pipeline schedules.

``get_forward_backward_func`` picks the schedule (no pipelining, or 1F1B when PP > 1) and runs
all micro-batches of the global batch (gradient accumulation).  The loss is summed over tokens
and divided by the tokens of the whole global batch (``calculate_per_token_loss``), so any
DP / micro-batch split computes the same number as one process.

Mixture-of-experts auxiliary losses (load balancing, z-loss) follow Megatron-LM: the router
attaches each one to its output with ``MoEAuxLossAutoScaler``, so its gradient joins the LM
loss's in the backward pass (the schedule sets the scale), i.e. the objective optimised is
``lm loss + coeff * aux loss``.  The reported ``loss`` stays the LM loss (comparable with dense
models).  Per-step metrics that model components contribute (``TrainingModel.metrics``) land
in the step's ``extra`` dict: the MoE layers report their aux losses from megatron's own
tracker (``load_balancing_loss``, ``z_loss``: mean per layer call, before the coefficient, as
Megatron-LM logs them) and their all-to-all traffic.
"""
from __future__ import annotations

import itertools
import math
from functools import partial

import torch
import torch.distributed as dist

from plt_train.training.guard import grads_are_finite


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(device, data_iterator, model):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_loss(reports) -> float | None:
    """Mean loss over the global batch, on last-stage ranks (None elsewhere)."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage():
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1]).item()


def _run_schedule(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size,
                  device, forward_only):
    """Several chunks on a pipeline rank (virtual stages) take the interleaved schedule, which
    wants one data iterator per chunk: each chunk reads every micro-batch once, in order, so
    they share the one iterator through ``tee``."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = ps.get_pipeline_model_parallel_world_size()
    vp = len(chunks) if pp > 1 and len(chunks) > 1 else None
    if vp:
        data_iterator = list(itertools.tee(data_iterator, vp))
    return get_forward_backward_func(pp_size=pp, vp_size=vp)(
        forward_step_func=partial(_forward_step, device),
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, data_iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, device) -> dict:
    """One optimizer step of ``model`` (a ``models.TrainingModel``: its ``chunks`` hold the
    parameters, its ``stages`` are what the schedule runs, its ``metrics`` report per step).
    ``loss`` is known on every rank; ``skipped``: no update was made (non-finite loss or
    gradient, or an fp16 overflow)."""
    for source in model.metrics:
        source.reset()
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(model.stages, data_iterator, num_microbatches, seq_length,
                            micro_batch_size, device, forward_only=False)
    loss = broadcast_from_last_rank(_reduce_loss(reports))
    # A non-finite loss or gradient makes no update and does not advance the schedule
    # (training/guard.py); every rank takes the same decision.
    ok, grad_norm = False, float("nan")
    if math.isfinite(loss) and grads_are_finite(model.chunks, device):
        ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    extra = {}  # e.g. MoE aux losses and all-to-all traffic
    for source in model.metrics:
        extra.update(source.collect())
    return {"loss": loss, "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"], "skipped": not ok, "extra": extra}


@torch.no_grad()
def evaluate(model, data_iterator, iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, device) -> float | None:
    for chunk in model.chunks:
        chunk.eval()
    reports = []
    for _ in range(iters):
        reports += _run_schedule(model.stages, data_iterator, num_microbatches,
                                 seq_length, micro_batch_size, device, forward_only=True)
    for chunk in model.chunks:
        chunk.train()
    return _reduce_loss(reports)


def broadcast_from_last_rank(value: float | None) -> float:
    """Make a last-stage scalar (loss) known on every rank (for logging and signals)."""
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=dist.get_world_size() - 1)
    return t.item()
