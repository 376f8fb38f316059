"""Full activation recompute for looped models: per layer, per loop.

megatron-core recomputes whole layers inside ``TransformerBlock`` (``_checkpointed_forward``),
which a looped model bypasses: it runs the shared block's layers itself, R times
(``LoopedGPTModel.run_block``).  So it checkpoints each (layer, loop) call here with the same
function megatron uses, ``tensor_parallel.checkpoint`` (reentrant; it restores the CPU
generator, the CUDA generator and the model-parallel RNG tracker before recomputing, so a
recomputed layer draws the same dropout masks).  What only a looped block needs:

* **Which loop.**  The backward pass recomputes loop r's layer long after the forward pass
  has moved on to later loops, so the wrapped call sets ``LoopState.row_loops`` itself.
* **Loop 1's shared K/V (PLT).**  Loop 1's attention queues its K/V for the later loops of
  the same layer.  Under recompute that forward runs without autograd and its recompute
  would queue a second copy, so the wrapper takes the K/V out of the layer instead
  (``LoopState.held``), returns them as outputs of the checkpointed call (they then carry
  its backward, so with ``model.loop.detach_kv=false`` the later loops' gradient reaches
  loop 1's projections through the recompute) and queues those.  A later loop's wrapper pops
  its entry before the call and passes it in as an input: the checkpoint keeps it for the
  recompute (it is alive anyway, as the later loop's attention input).  Detached first when
  ``detach_kv``: an edge into loop 1's checkpoint, even one carrying no gradient, would make
  a later loop's backward run loop 1's (under pipeline parallelism, before loop 1's own).
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from plt_train.models.plt.state import LoopState


def recomputed_layer(layer, state: LoopState, hidden, rope):
    """``layer(hidden)`` for the loop ``state`` is running, its activations dropped after
    the forward pass and recomputed in the backward pass."""
    loop = state.row_loops[0]
    attn = layer.self_attention
    lnum = attn.layer_number
    gives_kv = attn.shares_kv and loop == 0
    shared = attn.take_shared_kv(loop) if attn.shares_kv and loop > 0 else ()
    if attn.opts.detach_kv:  # constants to this loop: no edge back into loop 1's graph
        shared = tuple(t.detach() for t in shared)

    def run(x, *kv):
        outer_loops, state.row_loops = state.row_loops, [loop]
        state.held = {lnum: kv} if kv else {}
        try:
            out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
            if not gives_kv:
                return out
            # V is a view of the fused QKV projection's output: a copy lets that go.
            k, v = state.held[lnum]
            return out, k, v.contiguous()
        finally:
            state.held, state.row_loops = None, outer_loops

    outs = tensor_parallel.checkpoint(run, False, hidden, *shared)
    if not gives_kv:
        return outs
    out, k, v = outs
    if state.split_loops and not attn.opts.detach_kv:
        # The later loops are other pipeline chunks with their own (earlier) backward passes:
        # they get leaf copies, and loop 1's backward adds what they collected to K/V.  The
        # attention's tensor hook cannot do it here: K/V are outputs of the checkpoint that
        # loop 1 itself does not read, so their gradient there is None, not a tensor.
        leaves = tuple(t.detach().requires_grad_(True) for t in (k, v))
        attn.queue_shared_kv(*leaves)
        return _AddLaterLoopsGradient.apply(out, k, v, *leaves)
    attn._stash_shared_kv(k, v)
    return out


class _AddLaterLoopsGradient(torch.autograd.Function):
    """``out`` unchanged; in the backward pass loop 1's ``k`` and ``v`` receive the gradient
    the later loops left in their leaf copies (None where they left none)."""

    @staticmethod
    def forward(ctx, out, k, v, leaf_k, leaf_v):
        ctx.leaves = (leaf_k, leaf_v)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        leaf_k, leaf_v = ctx.leaves
        return grad, leaf_k.grad, leaf_v.grad, None, None


def recomputed_layers(config, layers: int) -> int:
    """How many of a stage's ``layers`` (the first ones) full recompute covers, from
    megatron's fields (``models/transformer_config.recompute_kwargs``): every layer with the
    uniform method (one layer per unit), the first ``recompute_num_layers`` with block."""
    if config.recompute_granularity != "full":
        return 0
    if config.recompute_method == "block":
        return min(config.recompute_num_layers, layers)
    return layers


def should_recompute(module: torch.nn.Module) -> bool:
    """Training with autograd on: evaluation and generation never recompute."""
    return module.training and torch.is_grad_enabled()
