"""What a configuration means per rank, computed without any process group: parallel sizes,
layers per pipeline stage, micro-batches, parameters and an estimate of memory per rank.

Used by ``plt_train.dryrun`` so a cluster-sized config (say 1024 GPUs) can be checked on a
laptop.  The memory figures are an estimate for planning, not a measurement:

* weights: parameters of the most loaded stage (the first or last, which also hold the
  embedding / LM head) in the training dtype, from the model family's count of a layer
  (``ModelFamily.layer_parameters``: attention, dense MLPs, G-SWA gates and shared experts
  split by TP; norms, routers and BigMac's projections replicated; each expert-parallel rank
  holding ``num_experts / EP`` whole experts);
* gradients: fp32 ``main_grad`` buffers (megatron DDP with ``grad_reduce_in_fp32``);
* optimizer: Adam's two fp32 moments, plus fp32 master weights when training in bf16; divided
  by the data-parallel size with the distributed optimizer;
* activations: what one micro-batch keeps for the backward pass, counted tensor by tensor
  for our layers (``models/activation_memory.py``: loops, PLT's shared K/V and G-SWA, MoE
  routed rows, ``model.recompute``; checked against a measurement in
  ``scripts/bench_memory.py``), times the micro-batches in flight: a 1F1B first stage keeps
  ``min(PP, micro-batches)`` of them, the last stage one plus the LM head's; a looped model
  under PP runs each loop as a virtual chunk (megatron's interleaved schedule), which keeps
  ``1 + (PP - 1) / (PP * R)`` times as much (Korthikanti et al. 2022).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from plt_train.config import RunConfig, derived_data_parallel
from plt_train.config.schema import MLPLayer, ModelName
from plt_train.models import get_family, validate
from plt_train.models.activation_memory import Device, activation_bytes

GiB = 1024**3


@dataclass(frozen=True)
class RankPlan:
    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    layers_per_stage: int
    micro_batches: int
    experts_per_rank: int | None
    total_params: int
    params_per_rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    activation_bytes: float
    """One micro-batch on the stage with the LM head (``models/activation_memory.py``)."""
    recompute: str

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib


def plan(cfg: RunConfig, world_size: int, vocab_size: int, bf16: bool = True,
         device: str = "cuda") -> RankPlan:
    """Validate ``cfg`` for ``world_size`` ranks (raises ConfigError) and size one rank of a
    run on ``device`` (cuda or cpu: what the fused kernels keep for backward differs)."""
    validate(cfg, world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = derived_data_parallel(cfg, world_size)
    vocab = m.padded_vocab_size(vocab_size)  # ConfigError when model.vocab_size is too small
    layer_parameters = get_family(m.name).layer_parameters
    layers = m.num_layers // p.pipeline
    embed = vocab * m.hidden_size
    heads = (1 if m.tie_embeddings else 2) * embed
    total = m.num_layers * layer_parameters(m, 1, 1) + heads + m.hidden_size
    # Most loaded stage: with one stage it holds both ends; else the first/last holds one end.
    ends = heads if p.pipeline == 1 else embed
    per_rank = layers * layer_parameters(m, p.tensor, p.expert) + ends // p.tensor + m.hidden_size
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = (8 + (4 if bf16 else 0)) * per_rank
    if p.use_distributed_optimizer:
        optimizer_bytes /= dp
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    act = partial(activation_bytes, m, p, t.micro_batch_size, layers, vocab,
                  bytes_per_element=weight_bytes, device=Device(device))
    in_flight = min(p.pipeline, micro_batches)
    first = act(head=p.pipeline == 1) * in_flight
    if p.pipeline > 1 and m.name in (ModelName.looped, ModelName.plt) and m.loops > 1:
        first *= 1 + (p.pipeline - 1) / (p.pipeline * m.loops)
    per_micro_batch = act(head=True)
    activations = max(first, per_micro_batch)
    return RankPlan(
        world=world_size, tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, dp=dp,
        layers_per_stage=layers, micro_batches=micro_batches,
        experts_per_rank=None if m.moe.layer == MLPLayer.dense else m.moe.num_experts // p.expert,
        total_params=total, params_per_rank=per_rank,
        weights_gib=per_rank * weight_bytes / GiB, grads_gib=per_rank * 4 / GiB,
        optimizer_gib=optimizer_bytes / GiB,
        activations_gib=activations / GiB, activation_bytes=per_micro_batch,
        recompute=str(m.recompute.granularity) if m.recompute.granularity != "selective"
        else "selective (" + ", ".join(m.recompute.modules) + ")",
    )


def format_plan(r: RankPlan) -> str:
    rows = [
        ("world size", r.world),
        ("tensor x pipeline x context x data", f"{r.tp} x {r.pp} x {r.cp} x {r.dp}"),
        ("expert parallel", r.ep),
        ("layers per pipeline stage", r.layers_per_stage),
        ("micro-batches per step (per DP rank)", r.micro_batches),
        ("experts per rank", "n/a (dense model)" if r.experts_per_rank is None
         else r.experts_per_rank),
        ("parameters (total)", f"{r.total_params:,}"),
        ("parameters on the most loaded rank", f"{r.params_per_rank:,}"),
        ("memory / rank: weights", f"{r.weights_gib:.2f} GiB"),
        ("memory / rank: fp32 grads", f"{r.grads_gib:.2f} GiB"),
        ("memory / rank: optimizer", f"{r.optimizer_gib:.2f} GiB"),
        ("activation recompute", r.recompute),
        ("activations / micro-batch (est.)", f"{r.activation_bytes / GiB:.3f} GiB"),
        ("memory / rank: activations (est.)", f"{r.activations_gib:.2f} GiB"),
        ("memory / rank: total (est.)", f"{r.total_gib:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
