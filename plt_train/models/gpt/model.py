"""The baseline decoder: megatron-core ``GPTModel`` with our layer specs.

RMSNorm, RoPE, SwiGLU, no biases; one model chunk per pipeline stage.
"""
from __future__ import annotations

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from plt_train.config.schema import ModelConfig
from plt_train.models.gpt.specs import decoder_block_spec
from plt_train.models.moe import moe_spec


def build_gpt(model: ModelConfig, tconfig, vocab_size: int, backend: str) -> GPTModel:
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=decoder_block_spec(tconfig, backend, mlp=moe_spec(model)),
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
    )
