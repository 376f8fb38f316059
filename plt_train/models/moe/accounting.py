"""What each rank puts on the expert-parallel all-to-all wire, measured at the call.

Every MoE all-to-all of our dispatcher goes through ``counted_all_to_all`` (an autograd
function like megatron-core's ``tensor_parallel.all_to_all``), which records, for this rank,
per phase (``dispatch`` / ``combine``, forward / backward):

* ``wire_bytes``: bytes this rank SENT to the other ranks of the group (rows of its input
  split addressed to another rank x the bytes of a row).  The rows addressed to itself never
  leave the device and are counted apart as ``local_bytes``.  This is what the paper's Table 3
  counts (its ``(ep - 1) / ep`` factor drops the local share), but measured from the actual
  split sizes, not from a formula.
  Bytes are those of the wire format actually sent (``model.moe.wire_format``, ``wire.py``).
* ``seconds``: time inside the call.  On CPU (gloo) the call blocks, so this is wall time.  On
  CUDA the collective runs on the compute stream (megatron's a2a dispatcher does not overlap
  it), so the interval between two CUDA events around it is the time the stream is stalled
  by the all-to-all: the exposed communication time, including waiting for slower peers.
  Events are resolved lazily in ``snapshot`` (one synchronisation per read, none per call).

Each MoE layer owns its counter (``FineGrainedMoE.a2a``); ``metrics.MoEStepMetrics`` resets
the model's counters at the start of a training step and reads them at the end
(``a2a_step_metrics``).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from plt_train.models.moe import wire

PHASES = ("dispatch_fwd", "combine_fwd", "dispatch_bwd", "combine_bwd")


def _as_int_list(splits) -> Optional[List[int]]:
    """gloo's all_to_all_single needs Python ints; megatron leaves split sizes as CPU tensors
    (or numpy arrays after its device-to-host copy on CUDA)."""
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


class A2ACounter:
    """Per-phase byte, call and time counters of one process (thread-safe: autograd may run
    the backward on another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.wire_bytes: Dict[str, int] = {p: 0 for p in PHASES}
            self.local_bytes: Dict[str, int] = {p: 0 for p in PHASES}
            self.calls: Dict[str, int] = {p: 0 for p in PHASES}
            self._seconds: Dict[str, float] = {p: 0.0 for p in PHASES}
            self._events: List[tuple] = []  # (phase, start_event, end_event) on CUDA

    def record(self, phase: str, wire: int, local: int, seconds: float = 0.0,
               events: Optional[tuple] = None) -> None:
        with self._lock:
            self.wire_bytes[phase] += wire
            self.local_bytes[phase] += local
            self.calls[phase] += 1
            self._seconds[phase] += seconds
            if events is not None:
                self._events.append((phase, *events))

    def seconds(self) -> Dict[str, float]:
        with self._lock:
            events, self._events = self._events, []
            for phase, start, end in events:
                end.synchronize()
                self._seconds[phase] += start.elapsed_time(end) / 1e3
            return dict(self._seconds)

    def snapshot(self) -> dict:
        """Totals since the last reset: ``a2a_bytes`` (wire, all phases), ``a2a_ms``, and the
        per-phase breakdown."""
        secs = self.seconds()
        with self._lock:
            return {
                "a2a_bytes": sum(self.wire_bytes.values()),
                "a2a_local_bytes": sum(self.local_bytes.values()),
                "a2a_calls": sum(self.calls.values()),
                "a2a_ms": 1e3 * sum(secs.values()),
                "phases": {p: {"wire_bytes": self.wire_bytes[p], "calls": self.calls[p],
                               "ms": 1e3 * secs[p]} for p in PHASES},
            }


def merged_snapshot(counters: Sequence[A2ACounter]) -> dict:
    """The totals of several counters (a model's MoE layers), as ``A2ACounter.snapshot``."""
    snaps = [c.snapshot() for c in counters]
    out = {key: sum(s[key] for s in snaps)
           for key in ("a2a_bytes", "a2a_local_bytes", "a2a_calls", "a2a_ms")}
    out["phases"] = {p: {k: sum(s["phases"][p][k] for s in snaps)
                         for k in ("wire_bytes", "calls", "ms")} for p in PHASES}
    return out


def _all_to_all(group, x: torch.Tensor, output_splits: Optional[Sequence[int]],
                input_splits: Optional[Sequence[int]], phase: str,
                counter: Optional[A2ACounter]) -> torch.Tensor:
    x = x.contiguous()
    world = group.size()
    rank = group.rank()
    if input_splits is None:  # equal splits
        input_splits = [x.shape[0] // world] * world
        output_splits = list(input_splits)
    out = x.new_empty([sum(output_splits), *x.shape[1:]])
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    sent_rows = sum(n for j, n in enumerate(input_splits) if j != rank)
    local_rows = input_splits[rank]
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(out, x, output_split_sizes=list(output_splits),
                               input_split_sizes=list(input_splits), group=group)
        end.record()
        if counter is not None:
            counter.record(phase, sent_rows * row_bytes, local_rows * row_bytes,
                           events=(start, end))
    else:
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x, output_split_sizes=list(output_splits),
                               input_split_sizes=list(input_splits), group=group)
        if counter is not None:
            counter.record(phase, sent_rows * row_bytes, local_rows * row_bytes,
                           seconds=time.perf_counter() - t0)
    return out


def _send(group, x: torch.Tensor, output_splits, input_splits, phase: str, fmt: str,
          counter: Optional[A2ACounter]) -> torch.Tensor:
    """One all-to-all of ``x``'s rows in wire format ``fmt`` (``wire.py``), counted at the
    bytes actually sent, returned in ``x``'s dtype."""
    payload = wire.encode(x, fmt)
    got = _all_to_all(group, payload, output_splits, input_splits, phase, counter)
    return wire.decode(got, fmt, x.dtype, x.shape[1:])


class _CountedAllToAll(torch.autograd.Function):
    """megatron-core's ``_AllToAll`` with accounting and a wire format; the backward is the
    reverse all-to-all (split sizes swapped), counted as the ``*_bwd`` phase.  The format's
    casts are straight-through: the gradient is sent in the backward's own format."""

    @staticmethod
    def forward(ctx, group, x, output_splits, input_splits, name, formats, counter):
        ctx.group, ctx.name, ctx.bwd_format = group, name, formats[1]
        ctx.output_splits, ctx.input_splits, ctx.counter = output_splits, input_splits, counter
        if group.size() == 1:
            return x
        return _send(group, x, output_splits, input_splits, f"{name}_fwd", formats[0], counter)

    @staticmethod
    def backward(ctx, grad):
        if ctx.group.size() == 1:
            return None, grad, None, None, None, None, None
        g = _send(ctx.group, grad, ctx.input_splits, ctx.output_splits, f"{ctx.name}_bwd",
                  ctx.bwd_format, ctx.counter)
        return None, g, None, None, None, None, None


def counted_all_to_all(group, x: torch.Tensor, output_splits, input_splits, name: str,
                       wire_format: str = "native",
                       counter: Optional[A2ACounter] = None) -> torch.Tensor:
    """All-to-all over ``group`` (variable splits), recorded in ``counter`` (None: not
    recorded) as ``name`` (``dispatch`` or ``combine``) forward and backward, in
    ``wire_format`` (``model.moe.wire_format``: native / bf16 / fp8, see ``wire.py``)."""
    if name not in ("dispatch", "combine"):
        raise ValueError(f"unknown all-to-all phase {name!r}")
    return _CountedAllToAll.apply(group, x, _as_int_list(output_splits),
                                  _as_int_list(input_splits), name,
                                  wire.phase_formats(wire_format, name), counter)


def a2a_step_metrics(counters: Sequence[A2ACounter]) -> dict:
    """Flat metrics of this step for the training loop's loggers: mean over ranks of the bytes
    each rank put on the wire (``a2a_MB``), mean and max over ranks of the time spent in the
    all-to-all.  A collective: every rank must call it (every rank built the same model)."""
    snap = merged_snapshot(counters)
    t = torch.tensor([float(snap["a2a_bytes"]), snap["a2a_ms"]], dtype=torch.float64)
    peak = torch.tensor([snap["a2a_ms"]], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t, peak = t.cuda(), peak.cuda()
        dist.all_reduce(t)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        t = t / dist.get_world_size()
    return {"a2a_MB": t[0].item() / 2**20, "a2a_ms": t[1].item(), "a2a_ms_max": peak.item()}
