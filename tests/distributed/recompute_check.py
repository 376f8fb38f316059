"""Activation recompute under tensor and pipeline parallelism (2 processes, gloo, fp32);
writes a JSON report.

    torchrun --standalone --nproc-per-node=2 tests/distributed/recompute_check.py OUT.json

For each layout (TP=2 with sequence parallelism, PP=2), each model (gpt, looped-2, PLT-2 with
BigMac MoE layers, PLT-2 with gradients into loop 1's K/V) and each ``model.recompute`` mode
(none, full, selective), one training step's forward and backward through megatron's
schedule (two micro-batches, hidden dropout 0.1, the same seed before each), as
``training/step.py`` runs it; also mode none without dropout.  Reported against mode none on
every rank: the loss, every gradient (megatron DDP's ``main_grad`` after
``finalize_model_grads``), and how many times megatron's ``tensor_parallel.checkpoint`` ran,
so a mode that silently recomputes nothing cannot pass.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

VOCAB, MICRO, MICRO_BATCHES = 96, 2, 2
MODELS = {
    "gpt": ["model.name=gpt"],
    "looped2": ["model.name=looped", "model.loops=2"],
    "plt2_bigmac": ["model.name=plt", "model.loops=2", "moe=bigmac"],
    # loop 2's gradient into loop 1's K/V: through loop 1's checkpoint, and under PP=2
    # handed over between the loops' separate backward passes
    "plt2_grad_kv": ["model.name=plt", "model.loops=2", "model.loop.detach_kv=false"],
}
LAYOUTS = {
    "tp2_sp": dict(tp=2, args=["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": dict(pp=2, args=["parallel.pipeline=2"]),
}
MODES = {
    "none": [],
    "no_dropout": ["model.hidden_dropout=0.0"],  # shows that the masks matter
    "full": ["model.recompute.granularity=full"],
    "selective": ["model.recompute.granularity=selective",
                  "model.recompute.modules=[core_attn,layernorm,{mlp}]"],
}


def batches(seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO, seq), generator=g)
        out.append({"tokens": tokens, "labels": torch.randint(0, VOCAB, (MICRO, seq), generator=g),
                    "position_ids": torch.arange(seq).repeat(MICRO, 1),
                    "loss_mask": torch.ones(MICRO, seq)})
    return out


def one_step(cfg, dev) -> tuple[float, dict, int]:
    """(loss, {parameter name: main_grad}, checkpoint calls) of one forward/backward."""
    from megatron.core import tensor_parallel

    from plt_train.models import get_family
    from plt_train.runtime import set_seed
    from plt_train.training.step import _reduce_loss, _run_schedule, broadcast_from_last_rank

    model = get_family(cfg.model.name).prepare_for_training(cfg, VOCAB, torch.float32, dev)
    calls = [0]
    shipped = tensor_parallel.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return shipped(*args, **kwargs)

    tensor_parallel.checkpoint = counted
    try:
        for chunk in model.chunks:
            chunk.zero_grad_buffer()
        set_seed(1234)  # the same dropout masks in every mode
        reports = _run_schedule(model.stages, iter(batches(cfg.model.seq_length)),
                                MICRO_BATCHES, cfg.model.seq_length, MICRO, dev.device,
                                forward_only=False)
    finally:
        tensor_parallel.checkpoint = shipped
    loss = broadcast_from_last_rank(_reduce_loss(reports))
    grads = {name: p.main_grad.detach().clone() for chunk in model.chunks
             for name, p in chunk.named_parameters()}
    return loss, grads, calls[0]


def main(out_path: str) -> None:
    from megatron.core import parallel_state as ps

    from plt_train.config.store import compose_config
    from plt_train.models import validate
    from plt_train.runtime import detect_device, destroy_distributed, init_distributed

    dev = detect_device()
    report: dict = {}
    for layout, spec in LAYOUTS.items():
        destroy_distributed()
        init_distributed(dev, tp=spec.get("tp", 1), pp=spec.get("pp", 1))
        for model, model_args in MODELS.items():
            base = None
            for mode, mode_args in MODES.items():
                mlp = "moe" if "moe=bigmac" in model_args else "mlp"
                cfg = compose_config(
                    ["experiment=debug", "model.hidden_dropout=0.1"] + model_args + spec["args"]
                    + [a.replace("{mlp}", mlp) for a in mode_args])
                validate(cfg, dist.get_world_size())
                loss, grads, calls = one_step(cfg, dev)
                if base is None:
                    base = (loss, grads)
                worst = max((g - base[1][n]).abs().max().item() for n, g in grads.items())
                scale = max(g.abs().max().item() for g in base[1].values())
                report.setdefault(f"{layout}|{model}|{mode}", {})[f"rank{dist.get_rank()}"] = {
                    "loss": loss, "loss_diff": abs(loss - base[0]), "grad_max_diff": worst,
                    "grad_scale": scale, "checkpoint_calls": calls,
                    "layers_per_stage": cfg.model.num_layers // spec.get("pp", 1),
                    "loops": 1 if cfg.model.name == "gpt" else cfg.model.loops,
                    "names_match": sorted(grads) == sorted(base[1]),
                    "pp_rank": ps.get_pipeline_model_parallel_rank()}
    destroy_distributed()
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        merged: dict = {}
        for r in reports:
            for key, ranks in r.items():
                merged.setdefault(key, {}).update(ranks)
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
