"""Looped decoders on megatron-core's ``GPTModel``: ``vanilla`` (R = 1), ``looped``, ``plt``.

The parameters are exactly GPTModel's (embedding, ``decoder.layers``, final norm, output
layer, plus PLT's G-SWA gates), so the shared block appears once in checkpoints and in the
parameter count however many loops run, and a ``vanilla`` model is a ``gpt`` model.  Only
``forward`` differs: it runs the block R times.

- ``looped``: loop r's input is loop r-1's output at the same position.
- ``plt`` (Cross-Loop Parallelism): loop r >= 2's input is
  ``emb_scale * Embed(x) + hidden_scale * shift(h^(r-1))``, shifted by one token (zero at the
  first), so at decode time every loop of a step already has its input.
- ``model.loop.norm_between_loops``: whether the non-final loop outputs go through the
  shared final norm before being fed on: by default yes for ``plt`` (the released PLT
  recipe, rescaled by ``hidden_scale``) and no for ``looped`` (its loop 2 continues the
  residual stream; ``ModelConfig.normed_loop_feed`` says why).
- The loss is on the final loop only.

Pipeline parallelism splits the block's layers over stages and the looped forward runs one
loop per virtual chunk (``pipeline.py``); this module holds the per-loop pieces it reuses.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import make_viewless_tensor

from plt_train.config.schema import ModelConfig, ModelName
from plt_train.models.gpt.specs import decoder_block_spec, local_self_attention_spec
from plt_train.models.moe import mlp_spec
from plt_train.models.plt.attention import LoopAttention
from plt_train.models.plt.ops import shift_one
from plt_train.models.plt.recompute import recomputed_layer, recomputed_layers, should_recompute
from plt_train.models.plt.state import LoopState

LOOPED = (ModelName.vanilla, ModelName.looped, ModelName.plt)  # the names this model builds


def loop_attention_spec(model: ModelConfig) -> ModuleSpec:
    base = local_self_attention_spec()
    return ModuleSpec(module=LoopAttention, submodules=base.submodules, params={
        "attn_mask_type": AttnMaskType.causal, "model": model})


class LoopedGPTModel(GPTModel):
    """``model.name`` vanilla, looped or plt (``model.loops`` passes; vanilla runs once)."""

    def __init__(self, model: ModelConfig, tconfig, vocab_size: int):
        if model.name not in LOOPED:
            raise ValueError(f"LoopedGPTModel builds {[str(n) for n in LOOPED]}, not "
                             f"{model.name!r}")
        spec = decoder_block_spec(tconfig, "local", mlp=mlp_spec(model),
                                  self_attention=loop_attention_spec(model))
        super().__init__(
            config=tconfig, transformer_layer_spec=spec, vocab_size=vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type="rope", rotary_base=int(model.rotary_base))
        self.kind = model.name
        self.loops = 1 if model.name == ModelName.vanilla else model.loops
        self.parallel_loops = model.parallel_loops
        self.shares_kv = model.shares_kv  # later loops read loop 1's K/V (its cache only)
        self.opts = model.loop
        self.normed_feed = model.normed_loop_feed
        # Under pipeline parallelism each loop is a virtual chunk of its own (pipeline.py),
        # with its own backward pass.
        split = ps.get_pipeline_model_parallel_world_size() > 1 and self.loops > 1
        self.loop_state = LoopState(split_loops=split)
        for layer in self.decoder.layers:
            layer.self_attention.state = self.loop_state

    # -- training / evaluation (no pipeline parallelism: all loops in one call) -------------
    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, **_unused):
        if not (self.pre_process and self.post_process):  # a pipeline stage, one loop
            return self.forward_loop(0, input_ids, position_ids, labels,
                                     self.decoder.input_tensor)
        emb = self.embed(input_ids, position_ids)
        rope = self.rotary_pos_emb(input_ids.shape[1])
        hidden, _ = self.run_loops(emb, rope)
        return self.head(hidden, labels)

    def forward_loop(self, loop: int, input_ids, position_ids, labels=None, received=None):
        """Loop ``loop`` over this pipeline stage's layers (one virtual chunk, pipeline.py).

        ``received`` is the previous stage's output or, on the first stage for loop r >= 2,
        the last stage's fed-on output of loop r-1.  The last stage returns the next loop's
        feed, or the loss (labels) / logits after the final loop.
        """
        rope = self.rotary_pos_emb(input_ids.shape[1])
        if self.pre_process:
            emb = self.embed(input_ids, position_ids)
            x = emb if loop == 0 else self.next_loop_input(emb, received)
        else:
            x = received
        self.loop_state.begin(loop)
        h = self.run_block(x, rope)
        if not self.post_process:
            return make_viewless_tensor(h, requires_grad=True, keep_graph=True)
        if loop == self.loops - 1:
            return self.head(h, labels)
        return make_viewless_tensor(self.between_loops(h), requires_grad=True, keep_graph=True)

    def run_loops(self, emb, rope, key_valid=None, cache=None):
        """All R loops over whole sequences -> (last loop's output, fed-on outputs of the
        non-final loops)."""
        x, fed = emb, []
        self.loop_state.shared_kv.clear()  # all loops run here: nothing may be left over
        for r in range(self.loops):
            self.loop_state.begin(r, key_valid=key_valid, cache=cache)
            h = self.run_block(x, rope)
            if r == self.loops - 1:
                return h, fed
            fed.append(self.between_loops(h))
            x = self.next_loop_input(emb, fed[-1], key_valid)

    # -- the per-loop pieces ----------------------------------------------------------------
    def embed(self, input_ids, position_ids):
        return self.embedding(input_ids=input_ids, position_ids=position_ids)

    def run_block(self, x, rope):
        """The shared block's layers of this stage, for the current loop.  Under full
        recompute (``model.recompute``) the first ``recomputed_layers`` of them keep only
        their input and run again in the backward pass (``recompute.py``)."""
        layers = self.decoder.layers
        recompute = recomputed_layers(self.config, len(layers)) if should_recompute(self) else 0
        for i, layer in enumerate(layers):
            if i < recompute:
                x = recomputed_layer(layer, self.loop_state, x, rope)
            else:
                x, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        return x

    def between_loops(self, h):
        return self.decoder.final_layernorm(h) if self.normed_feed else h

    def next_loop_input(self, emb, fed, key_valid=None):
        if self.kind != ModelName.plt:
            return fed
        return self.cross_loop_input(emb, self.shift(fed, key_valid))

    def cross_loop_input(self, emb, previous):
        """PLT's loop r >= 2 input from the previous position's loop r-1 output."""
        return self.opts.emb_scale * emb + self.opts.hidden_scale * previous

    def shift(self, h, key_valid=None):
        """Shift by one token.  Under sequence parallelism each TP rank holds a slice of the
        sequence, so the shift crosses slices: gather, shift, take our slice back."""
        if not self.config.sequence_parallel:
            return shift_one(h, key_valid)
        full = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
        return scatter_to_sequence_parallel_region(shift_one(full, key_valid))

    def head(self, hidden, labels=None):
        """Final norm, LM head, and the per-token loss (labels) or [b, s, vocab] logits."""
        hidden = self.decoder.final_layernorm(hidden)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else None)
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def rope_at(self, positions: torch.Tensor, max_len: int) -> torch.Tensor:
        """RoPE frequencies for explicit positions [b, s] (all < ``max_len``) -> [s, b, 1, dim].

        The table is megatron's ``RotaryEmbedding(max_len)``, which it caches per length: a
        fixed ``max_len`` (the KV cache's) computes it once per generation, with no host sync.
        """
        table = self.rotary_pos_emb(max_len)  # [max_len, 1, 1, dim]
        return table[positions.t()].flatten(2, 3)
