"""Pipeline parallelism for looped models: one virtual pipeline chunk per loop.

The layers of the shared block are split over the pipeline stages as usual; a micro-batch
then travels the pipeline R times.  megatron-core's interleaved 1F1B schedule already moves
activations from the last stage back to the first between virtual chunks, so we reuse it
with R chunks that share ONE module: chunk r runs loop r over this stage's layers.  Loop 1's
K/V of a layer therefore stay on the stage that owns the layer, where loops r >= 2 read them.

The chunks are thin views (``LoopChunk``) with no parameters of their own: DDP, the
optimizer, checkpoints and ``finalize_model_grads`` see the one real module, and the schedule
sees R chunks.  Their config is a copy of the model's with
``virtual_pipeline_model_parallel_size = R`` (what the schedule reads to tell first / last
virtual stages apart); the layers keep the original, so layer counts and offsets are those
of plain pipeline parallelism.
"""
from __future__ import annotations

import copy

import torch


class LoopChunk(torch.nn.Module):
    def __init__(self, wrapped, loop: int, config):
        super().__init__()
        object.__setattr__(self, "_wrapped", wrapped)  # not a submodule: no parameters here
        self.vp_stage, self.config = loop, config
        self.model_type = self.core.model_type
        self.input_tensor = None

    @property
    def core(self):
        return getattr(self._wrapped, "module", self._wrapped)  # under DDP or not

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, **_unused):
        return self.core.forward_loop(self.vp_stage, input_ids, position_ids, labels,
                                      self.input_tensor)


def loop_pipeline_chunks(chunks: list) -> list:
    """The chunks megatron's schedule runs: R loop views when pipelining a looped model."""
    from megatron.core import parallel_state as ps

    (wrapped,) = chunks
    core = getattr(wrapped, "module", wrapped)
    if ps.get_pipeline_model_parallel_world_size() == 1 or core.loops == 1:
        return chunks
    assert core.loop_state.split_loops  # set by the model for PP > 1 (attention.py reads it)
    config = copy.copy(core.config)
    config.virtual_pipeline_model_parallel_size = core.loops
    return [LoopChunk(wrapped, r, config) for r in range(core.loops)]
