"""Checkpoints other tools can read: ``plt-export RUN_DIR OUT_DIR`` writes a gpt / vanilla
dense model in the Hugging Face Llama format (``model.safetensors``, ``config.json``, the
tokenizer), which ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads on any
machine; ``import_llama`` reads such a folder back into our parameter names.

Any training layout exports: the run's latest (or the given) checkpoint is loaded into one
process, where megatron's distributed checkpoint reshards it.  The model is the same function
in both libraries (tests/test_export.py compares the logits):

* megatron's fused QKV projection holds, for each of the ``g`` query groups, that group's
  ``n/g`` query heads, then its key head, then its value head; Llama's ``q_proj`` /
  ``k_proj`` / ``v_proj`` hold the heads in the same group order (``repeat_kv``);
* the first SwiGLU linear is ``[gate; up]`` (megatron's ``glu`` applies SiLU to the first
  half), Llama's ``gate_proj`` / ``up_proj``;
* RoPE is the non-interleaved ("rotate half") form with the same frequencies in both; RMSNorm,
  no biases, untied or tied output layer alike; the padded vocabulary is kept (its extra rows
  are never produced by the tokenizer).

Not exported: looped and PLT models (R passes through one block, PLT's shifted inputs and
G-SWA are not a Llama) and MoE layers (no Llama counterpart for BigMac's projections or our
router); each is refused with one line.  Checkpoints of the Transformer Engine backend use
other parameter names and are refused too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from plt_train.config.schema import MLPLayer, ModelConfig, ModelName


class ExportError(ValueError):
    """Something that cannot be exported, or a bad argument; one line for the user."""


def check_exportable(model: ModelConfig) -> None:
    if model.name not in (ModelName.gpt, ModelName.vanilla):
        raise ExportError(f"model.name={model.name}: only gpt and vanilla models have a Llama "
                          "counterpart (a looped or PLT model runs its block several times)")
    if model.moe.layer != MLPLayer.dense:
        raise ExportError(f"model.moe.layer={model.moe.layer}: MoE layers have no Llama "
                          "counterpart; only dense models export")


def llama_config(model: ModelConfig, vocab: int, eos_token_id: int) -> dict:
    """``config.json`` of the Llama model equal to ``model`` (padded vocabulary ``vocab``)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups, "head_dim": model.head_dim,
        "vocab_size": vocab, "max_position_embeddings": model.seq_length,
        "rms_norm_eps": model.norm_epsilon, "rope_theta": float(model.rotary_base),
        "tie_word_embeddings": model.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": model.init_method_std, "torch_dtype": "float32",
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }


# Parameters that keep their values, (ours, Llama's): whole-model, then per layer.
_SAME_TOP = (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight"))
_SAME_LAYER = (("input_layernorm.weight", "input_layernorm.weight"),
               ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
               ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
               ("mlp.linear_fc2.weight", "mlp.down_proj.weight"))


def _same_names(model: ModelConfig) -> list[tuple[str, str]]:
    pairs = list(_SAME_TOP)
    if not model.tie_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    for i in range(model.num_layers):
        pairs += [(f"decoder.layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in _SAME_LAYER]
    return pairs


def to_llama(state: dict, model: ModelConfig) -> dict:
    """Our (one-process, local-backend) parameters -> Llama's names and layouts."""
    n, g, d, f = model.num_attention_heads, model.query_groups, model.head_dim, model.ffn_size
    out = {theirs: state[ours] for ours, theirs in _same_names(model)}
    for i in range(model.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[ours + "self_attention.linear_qkv.weight"]
        q, k, v = qkv.view(g, (n // g + 2) * d, model.hidden_size).split([n // g * d, d, d], 1)
        fc1 = state[ours + "mlp.linear_fc1.weight"]
        out.update({theirs + "self_attn.q_proj.weight": q.reshape(n * d, -1),
                    theirs + "self_attn.k_proj.weight": k.reshape(g * d, -1),
                    theirs + "self_attn.v_proj.weight": v.reshape(g * d, -1),
                    theirs + "mlp.gate_proj.weight": fc1[:f],
                    theirs + "mlp.up_proj.weight": fc1[f:]})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_llama(tensors: dict, model: ModelConfig) -> dict:
    """The inverse of ``to_llama``: Llama's parameters -> ours."""
    n, g, d, h = model.num_attention_heads, model.query_groups, model.head_dim, model.hidden_size
    out = {ours: tensors[theirs] for ours, theirs in _same_names(model)}
    for i in range(model.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = tensors[theirs + "self_attn.q_proj.weight"].view(g, n // g * d, h)
        k = tensors[theirs + "self_attn.k_proj.weight"].view(g, d, h)
        v = tensors[theirs + "self_attn.v_proj.weight"].view(g, d, h)
        out[ours + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        out[ours + "mlp.linear_fc1.weight"] = torch.cat([tensors[theirs + "mlp.gate_proj.weight"],
                                                         tensors[theirs + "mlp.up_proj.weight"]])
    return out


def model_config_from_llama(config: dict) -> ModelConfig:
    """Our ``ModelConfig`` (name gpt, dense) for a Llama ``config.json``."""
    return ModelConfig(
        name=ModelName.gpt, num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"], seq_length=config["max_position_embeddings"],
        vocab_size=config["vocab_size"], make_vocab_size_divisible_by=1,
        rotary_base=config.get("rope_theta", 10000.0), norm_epsilon=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def export_llama(chunk, model: ModelConfig, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``chunk`` (our model, one process) as a Hugging Face Llama folder."""
    from safetensors.torch import save_file

    check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [k for k in ("decoder.layers.0.self_attention.linear_qkv.weight",
                           "decoder.layers.0.mlp.linear_fc1.weight") if k not in state]
    if missing:
        raise ExportError(f"the checkpoint has no {missing[0]}: only the local backend's "
                          "parameter names export (a model.backend=te run uses TE's)")
    tensors = to_llama(state, model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    (out / "config.json").write_text(json.dumps(
        llama_config(model, vocab, tokenizer.eod), indent=1))
    tokenizer.save(out / "tokenizer.json")
    eos = tokenizer.hf.id_to_token(tokenizer.eod)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
        "model_max_length": model.seq_length}, indent=1))
    return out


def import_llama(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(our ModelConfig, our parameters) from a Hugging Face Llama folder."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ExportError(f"{hf_dir}: model_type {config.get('model_type')!r}, not llama")
    model = model_config_from_llama(config)
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return model, from_llama(tensors, model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plt-export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a training run's directory")
    parser.add_argument("out_dir", help="where to write the Hugging Face folder")
    parser.add_argument("--checkpoint", default=None,
                        help="a step_N folder (default: the run's latest)")
    args = parser.parse_args(argv)
    from plt_train.runtime.quiet import quiet_start

    quiet_start()
    from plt_train.generate import GenerateError, load_trained
    from plt_train.training.integrity import CheckpointError

    try:
        chunk, cfg, tokenizer, _ = load_trained(args.run_dir, args.checkpoint,
                                             before_build=check_exportable)
        out = export_llama(chunk, cfg.model, tokenizer, args.out_dir)
    except (ExportError, GenerateError, CheckpointError) as err:
        print(f"plt-export: {err}", file=sys.stderr)
        return 2
    print(f"[plt-export] {cfg.model.name} model ({cfg.model.num_layers} layers, hidden "
          f"{cfg.model.hidden_size}) -> {out} (Llama format: transformers' "
          "AutoModelForCausalLM.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
