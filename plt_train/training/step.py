"""One optimizer step and one validation pass, through megatron-core's pipeline schedules.

``get_forward_backward_func`` picks the schedule (no pipelining, or 1F1B when PP > 1) and runs
all micro-batches of the global batch (gradient accumulation).  The loss is summed over tokens
and divided by the tokens of the whole global batch (``calculate_per_token_loss``), so any
DP / micro-batch split computes the same number as one process.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist


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
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, device),
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(chunks, optimizer, scheduler, data_iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, device) -> dict:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(chunks, data_iterator, num_microbatches, seq_length,
                            micro_batch_size, device, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"loss": _reduce_loss(reports), "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"], "skipped": not ok}


@torch.no_grad()
def evaluate(chunks, data_iterator, iters: int, num_microbatches: int, seq_length: int,
             micro_batch_size: int, device) -> float | None:
    for chunk in chunks:
        chunk.eval()
    reports = []
    for _ in range(iters):
        reports += _run_schedule(chunks, data_iterator, num_microbatches, seq_length,
                                 micro_batch_size, device, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _reduce_loss(reports)


def broadcast_from_last_rank(value: float | None) -> float:
    """Make a last-stage scalar (loss) known on every rank (for logging and signals)."""
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=dist.get_world_size() - 1)
    return t.item()
