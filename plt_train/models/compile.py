"""``model.compile``: each transformer layer compiled with ``torch.compile`` (torchtitan's
per-block compile), in place.

Why per layer and not the whole model: a layer is the unit that repeats, so one compiled graph
serves every layer of a dense model, compile time does not grow with depth, and the parts
around the layers (embedding, loss, pipeline hand-offs, megatron's schedule) stay eager.
``nn.Module.compile`` compiles the layer's ``__call__`` without wrapping the module, so the
parameter names, the checkpoints and megatron's DDP hooks are those of the eager model.

What a graph is specialised on (dynamo guards), and so how many graphs a model compiles:

* dense ``gpt`` layers: one graph for all layers (parameters are graph inputs);
* looped models: one per (layer, loop), since a loop's attention reads the loop index and its
  layer's entry of the shared K/V queue (``LoopState``); times two for the no-grad forward of
  full recompute and evaluation;
* MoE layers: the attention half compiles as above; the MoE MLP runs eagerly inside the
  compiled layer (``keep_moe_eager``: one break, at its call).  Traced through, its dispatch
  breaks at the host syncs named in ``MOE_HOST_SYNCS`` and recompiles every step.

Dynamo falls back to eager for a function once it has compiled ``recompile_limit`` (8)
variants of it, and every layer runs the same ``__call__``: ``compile_layers`` raises the
limit to what the model needs, so a 16-layer PLT-2 model is compiled, not silently eager.
"""
from __future__ import annotations

import dataclasses

import torch

# Graph variants per (layer, loop): training, the no-grad forward (full recompute's first
# pass, evaluation), and one spare for a mode switch dynamo may specialise on.
_VARIANTS_PER_LAYER_LOOP = 3


def compiled_graph_limit(layers: int, loops: int) -> int:
    """How many compiled variants of a layer's ``__call__`` a model of ``layers`` layers per
    stage and ``loops`` loops may need."""
    return layers * max(loops, 1) * _VARIANTS_PER_LAYER_LOOP


def compile_layers(chunks: list, model, device) -> None:
    """Compile every transformer layer of each chunk (``model``: their ``ModelConfig``) in
    place, before DDP wraps them; the Triton kernels' first-use checks run first, eagerly."""
    check_kernels(model, device)
    layers = [layer for chunk in chunks for layer in chunk.decoder.layers]
    limit = compiled_graph_limit(len(layers), model.loops)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)
    for layer in layers:
        keep_moe_eager(layer)
        layer.compile()


def keep_moe_eager(layer) -> None:
    """Run ``layer``'s MoE MLP (if it has one) eagerly inside the compiled layer: one graph
    break, at its call.  Traced through, the dispatch breaks at its host syncs anyway
    (``MOE_HOST_SYNCS``), and the code after each sync is specialised on the synced values
    (split sizes, tokens per expert) and on the layer's counters, so it recompiled at every
    step: 1.4 s per step against 21 ms eager (scripts/bench_compile.py, 2026-12-05)."""
    from plt_train.models.moe.layer import FineGrainedMoE

    if isinstance(layer.mlp, FineGrainedMoE):
        layer.mlp.forward = torch.compiler.disable(layer.mlp.forward, recursive=True)


def compiled_layers(chunks: list) -> int:
    """How many modules in ``chunks`` (DDP-wrapped or not) ``compile_layers`` compiled."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None
               for chunk in chunks for m in chunk.modules())


def check_kernels(model, device) -> None:
    """Run now the first-use checks (``kernels.verified``) of the Triton kernels ``model``
    selects under ``auto`` on ``device``: a check runs a forward and a backward, which cannot
    happen inside a graph being traced."""
    from plt_train.config.schema import KernelChoice, MLPLayer
    from plt_train.kernels import triton_unusable_reason, use_triton, verified

    triton_unusable_reason(device)  # tries the import now, not inside a trace
    if model.uses_gswa and model.loop.kernel == KernelChoice.auto \
            and use_triton(model.loop.kernel, device):
        from plt_train.kernels import gswa
        verified("gswa", device, gswa._self_check)
    if model.moe.layer != MLPLayer.dense and model.moe.dcca_kernel == KernelChoice.auto \
            and use_triton(model.moe.dcca_kernel, device):
        from plt_train.kernels import dcca
        verified("dcca", device, dcca.self_check)


# Where an MoE layer's graph breaks, each a host synchronisation the dispatch needs: (file,
# function) of a frame of the break's stack -> its name.  Tokens go to experts in numbers
# known only from the data, and the all-to-all needs its split sizes on the host.  Compiled
# layers run the MoE MLP eagerly (``keep_moe_eager``): one break, the first entry; the others
# are where a trace through the dispatch breaks.
MOE_HOST_SYNCS = {
    ("transformer_layer.py", "_forward_mlp"):
        "the MoE MLP runs eagerly (its dispatch syncs with the host: the entries below)",
    ("token_dispatcher.py", "_maybe_dtoh_and_synchronize"):
        "the dispatcher copies the split sizes and tokens per expert to the host",
    ("moe_utils.py", "permute"): "permute: masked_select of the routed tokens and their "
                                 "probabilities (as many rows as routed pairs)",
    ("moe_utils.py", "unpermute"): "unpermute: masked_select of the probabilities (same)",
    ("moe/experts.py", "forward"): "experts, one matmul per expert: the token counts as Python "
                                   "ints (fp32; torch._grouped_mm traces in bf16 only)",
}


@dataclasses.dataclass
class GraphBreak:
    """One place dynamo had to leave the graph: why, and the innermost frames of the code."""

    reason: str
    where: list

    @property
    def host_sync(self) -> str | None:
        """The name of the MoE host sync this break is (``MOE_HOST_SYNCS``), or None."""
        for frame in self.where:  # "path:line function"
            path, function = frame.split(":")[0], frame.rsplit(" ", 1)[-1]
            for (file, func), name in MOE_HOST_SYNCS.items():
                if path.endswith(file) and function == func:
                    return name
        return None

    def as_dict(self) -> dict:
        return {"reason": self.reason, "where": self.where, "host_sync": self.host_sync}


def graph_breaks(fn, *args, **kwargs) -> tuple[int, list[GraphBreak]]:
    """(graphs, breaks) of ``fn(*args, **kwargs)`` as dynamo traces it
    (``torch._dynamo.explain``): a function that compiles to one graph has no breaks."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    breaks = []
    for b in explained.break_reasons:
        first = str(b.reason).strip().splitlines()[0]
        explanation = [line.split("Explanation:", 1)[1].strip()
                       for line in str(b.reason).splitlines() if "Explanation:" in line]
        reason = f"{first}: {explanation[0]}" if explanation else first
        where = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in b.user_stack[-3:]]
        breaks.append(GraphBreak(reason, where))
    torch._dynamo.reset()
    return explained.graph_count, breaks


def _short(path: str) -> str:
    for marker in ("site-packages/", "plt_train/"):
        if marker in path:
            return (marker if marker == "plt_train/" else "") + path.split(marker, 1)[1]
    return path
