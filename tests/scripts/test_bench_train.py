"""``scripts/bench_train.py`` end to end at the tiny CPU shape, and the plain baseline's size.

Ours' parameter count is checked two ways: in the subprocess run (``params`` of the ``ours``
record comes from ``build_model``, compared with ``plain_eager``'s), and here in-process against
a closed-form count of our megatron GPT layout (no process group needed in the pytest process).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import torch

from tests.helpers import REPO, one_process_env

sys.path.insert(0, str(REPO / "scripts"))

from plain_gpt import PlainGPT, count_parameters, expected_parameters  # noqa: E402

from plt_train.config.schema import ModelConfig  # noqa: E402

TINY = dict(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=128)


def _tiny_plain(vocab: int = 1024) -> tuple[PlainGPT, ModelConfig, int]:
    cfg = ModelConfig(**TINY)
    padded = cfg.padded_vocab_size(vocab)
    model = PlainGPT(vocab_size=padded, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_size,
                     seq_length=cfg.seq_length)
    return model, cfg, padded


def test_plain_parameter_count_matches_ours():
    model, cfg, padded = _tiny_plain()
    h, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    # Our GPTModel's parameters, tensor by tensor (MHA, untied, no biases).
    ours = (padded * h  # embedding.word_embeddings
            + L * (h  # input_layernorm
                   + 3 * h * h  # self_attention.linear_qkv
                   + h * h  # self_attention.linear_proj
                   + h  # pre_mlp_layernorm
                   + 2 * f * h  # mlp.linear_fc1 (gate and up)
                   + h * f)  # mlp.linear_fc2
            + h  # decoder.final_layernorm
            + padded * h)  # output_layer
    assert count_parameters(model) == ours
    assert expected_parameters(padded, h, L, f) == ours


def test_plain_initial_loss_is_near_uniform():
    model, cfg, padded = _tiny_plain()
    tokens = torch.randint(0, padded, (2, cfg.seq_length))
    with torch.no_grad():
        loss = model(tokens, tokens.roll(-1, dims=1)).item()
    assert abs(loss - math.log(padded)) < 0.1


def test_bench_train_tiny(tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, "scripts/bench_train.py", "--tiny", "--steps", "2", "--warmup", "1",
           "--which", "ours,plain_eager", "--out", str(out), "--plot", str(plot)]
    env = one_process_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # its own group
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "ratio ours / plain_eager" in proc.stdout

    records = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"ours", "plain_eager"}
    for r in records.values():
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["tflops"] > 0
        assert 0 < r["mfu"]
        assert r["precision"] == "fp32" and r["device"] == "cpu"
        assert r["shape"]["hidden_size"] == 128 and r["shape"]["micro_batch_size"] == 2
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    # Same model: same parameters, same initial loss up to init differences (~ln V for both).
    assert records["ours"]["params"] == records["plain_eager"]["params"]
    for r in records.values():
        assert abs(r["losses"][0] - math.log(1024)) < 0.1
    assert plot.exists() and plot.stat().st_size > 0


def test_set_builds_the_typed_model_config_and_keeps_plain_baselines_to_dense_gpts():
    """``--set`` merges into the typed schema as the main job does (nested loop / moe groups
    become their dataclasses; a typo fails), and a PLT or MoE model runs ``ours`` alone: the
    plain baselines are dense GPTs and would time another model."""
    import pytest
    from omegaconf.errors import ConfigKeyError

    import bench_train
    from plt_train.config.schema import LoopConfig, MoEConfig

    args = bench_train.parse_args(["--tiny", "--layers", "3", "--set", "name=plt", "loops=2",
                                   "loop.kernel=torch", "moe.layer=bigmac", "moe.top_k=2"])
    cfg, vocab, mb = bench_train.model_config(args)
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.loop, LoopConfig)
    assert isinstance(cfg.moe, MoEConfig)
    assert (cfg.name, cfg.loops, cfg.loop.kernel, cfg.moe.layer, cfg.moe.top_k) == (
        "plt", 2, "torch", "bigmac", 2)
    assert (cfg.num_layers, cfg.hidden_size, vocab, mb) == (3, 128, 1024, 2)
    full = bench_train.model_config(bench_train.parse_args(
        ["--model-config", str(REPO / "configs/model/plt2.yaml")]))[0]
    assert full.loop.detach_kv is False and full.loops == 2  # the preset's nested group
    with pytest.raises(ConfigKeyError):
        bench_train.model_config(bench_train.parse_args(["--tiny", "--set", "loop.kernal=x"]))

    assert bench_train.select_variants(None, cuda=True, plain_gpt=False) == ["ours"]
    with pytest.raises(SystemExit, match="--which ours"):
        bench_train.select_variants("ours,plain_eager", cuda=True, plain_gpt=False)
    assert bench_train.select_variants(None, cuda=True) == list(bench_train.VARIANTS)
