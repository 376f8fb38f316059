"""``plt-export``: gpt / vanilla dense checkpoints in the Hugging Face Llama format.

The exported folder, loaded with ``transformers`` on CPU, gives our logits (fp32, same
weights: the only differences are the order of floating-point operations), for multi-head and
grouped-query attention, tied and untied embeddings; ``import_llama`` reads it back to our
exact parameters; a run trained at TP=2 exports through the command line (its checkpoint is
resharded into one process).  Looped, PLT and MoE models are refused in one line.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from plt_train.config.schema import ModelConfig, MoEConfig, ParallelConfig
from plt_train.export import ExportError, check_exportable, export_llama, import_llama
from plt_train.runtime.device import megatron_device_kwargs
from tests.helpers import DEBUG_ARGS, REPO, one_process_env, run_train

transformers = pytest.importorskip("transformers")
VOCAB, SEQ = 300, 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from plt_train.data.tokenizer import train_bpe

    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    return train_bpe(docs, VOCAB, tmp_path_factory.mktemp("tok") / "t.tokenizer.json")


def build(dev, model: ModelConfig):
    from plt_train.models import build_model

    chunks, _, vocab = build_model(model, ParallelConfig(), VOCAB, torch.float32,
                                   megatron_device_kwargs(dev), 11, dev.device)
    return chunks[0].eval(), vocab


def ours_and_hf_logits(chunk, out_dir, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1])[None]
        return chunk(tokens, pos, None), hf(tokens).logits


@pytest.mark.parametrize("groups,tied", [(4, False), (2, False), (1, True)],
                         ids=["mha", "gqa", "mqa_tied"])
def test_transformers_computes_our_logits_and_import_gives_our_weights(
        one_rank, tokenizer, tmp_path, groups, tied):
    model = ModelConfig(name="gpt", num_layers=2, hidden_size=64, num_attention_heads=4,
                        num_query_groups=groups, seq_length=SEQ, init_method_std=0.1,
                        tie_embeddings=tied, rotary_base=500.0, norm_epsilon=1e-6)
    chunk, vocab = build(one_rank, model)
    export_llama(chunk, model, tokenizer, tmp_path / "hf")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ours, theirs = ours_and_hf_logits(chunk, tmp_path / "hf", tokens)
    assert ours.shape == theirs.shape == (2, SEQ, vocab)
    assert ours.abs().max() > 1  # init std 0.1: logits far from zero, so the check bites
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # The tokenizer travels along and encodes as ours.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("def f1(x):")["input_ids"] == tokenizer.tokenize("def f1(x):")

    imported_model, state = import_llama(tmp_path / "hf")
    again, again_vocab = build(one_rank, imported_model)
    assert again_vocab == vocab
    missing, unexpected = again.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    original = chunk.state_dict()
    for name, value in state.items():  # only copies, splits and joins: exact
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("model,words", [
    (ModelConfig(name="plt", loops=2), "only gpt and vanilla"),
    (ModelConfig(name="gpt", moe=MoEConfig(layer="bigmac")), "MoE layers have no Llama"),
])
def test_models_without_a_llama_counterpart_are_refused(model, words):
    with pytest.raises(ExportError, match=words):
        check_exportable(model)


def test_a_tp2_run_exports_from_the_command_line(one_rank, tmp_path, data_cache):
    run = tmp_path / "run"
    run_train(run, DEBUG_ARGS + ["model.name=gpt", "parallel.tensor=2", "train.steps=2",
                                 "checkpoint.save_at_end=true"], nproc=2)
    env = one_process_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "plt_train.export", str(run), str(tmp_path / "hf")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Llama format" in proc.stdout

    from plt_train.generate import load_trained

    chunk, cfg, _, _ = load_trained(run)
    tokens = torch.randint(0, 500, (1, 32), generator=torch.Generator().manual_seed(1))
    ours, theirs = ours_and_hf_logits(chunk.eval(), tmp_path / "hf", tokens)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)



def test_a_bad_run_directory_is_one_line(tmp_path, capsys):
    from plt_train.export import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plt-export: ") and "does not exist" in err and "Traceback" not in err
