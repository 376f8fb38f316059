"""Checksums, run identity and the writer lock, without a process group (the real runs are in
tests/distributed/test_checkpoint_integrity.py)."""
from __future__ import annotations

import os

import pytest

from plt_train.config.schema import LoopConfig, ModelConfig, MoEConfig
from plt_train.data.tokenizer import Tokenizer, train_bpe
from plt_train.training.integrity import (
    MANIFEST, CheckpointError, WriterLock, damage, identity_mismatch, run_identity,
    write_manifest,
)


def test_manifest_then_every_kind_of_damage(tmp_path):
    for name, size in (("__0_0.distcp", 10_000), (".metadata", 300), ("common.pt", 50)):
        (tmp_path / name).write_bytes(os.urandom(size))
    assert damage(tmp_path) == f"{MANIFEST} is missing"
    write_manifest(tmp_path)
    assert damage(tmp_path) is None
    shard = tmp_path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 1  # one flipped bit
    shard.write_bytes(bytes(data))
    assert damage(tmp_path) == "__0_0.distcp: checksum mismatch"
    (tmp_path / "common.pt").write_bytes(b"x" * 10)
    assert damage(tmp_path) == ("__0_0.distcp: checksum mismatch (and 1 more)")
    (tmp_path / ".metadata").unlink()
    assert damage(tmp_path).startswith(".metadata: missing (and 2 more)")
    (tmp_path / MANIFEST).write_text("[]")
    assert damage(tmp_path) == f"{MANIFEST} is unreadable"


def test_identity_names_what_changed(tmp_path):
    docs = ["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.getcwd())\n" * 20]
    tok_a = train_bpe(docs, 300, tmp_path / "a.json")
    tok_b = train_bpe(docs[::-1] + ["class A:\n    pass\n" * 30], 300, tmp_path / "b.json")
    dense = ModelConfig(hidden_size=64, num_attention_heads=4)
    base = run_identity(dense, tok_a)
    assert identity_mismatch(base, run_identity(dense, tok_a)) is None
    assert identity_mismatch(None, base) is None  # a checkpoint from before identities
    wider = ModelConfig(hidden_size=128, num_attention_heads=4)
    assert identity_mismatch(base, run_identity(wider, tok_a)) == (
        "model.hidden_size: 64 in the checkpoint, 128 here (and 1 more differences)")
    assert identity_mismatch(base, run_identity(dense, tok_b)).startswith("tokenizer ")
    same_size = Tokenizer(tok_a.hf, sha256="0" * 64)  # same size, other tokens
    assert identity_mismatch(base, run_identity(dense, same_size)) == (
        f"tokenizer sha256: {tok_a.sha256} in the checkpoint, {'0' * 64} here")
    moe = ModelConfig(hidden_size=64, num_attention_heads=4,
                      moe=MoEConfig(layer="bigmac", num_experts=8))
    more_experts = ModelConfig(hidden_size=64, num_attention_heads=4,
                               moe=MoEConfig(layer="bigmac", num_experts=16))
    assert identity_mismatch(run_identity(moe, tok_a), run_identity(more_experts, tok_a)) == (
        "model.moe.num_experts: 8 in the checkpoint, 16 here")


def test_identity_holds_the_loop_input_scales_of_a_cross_loop_model(tmp_path):
    """Another ``hidden_scale`` is another function of the same parameters; a checkpoint
    from before the scales were recorded was trained at the then default 1.0."""
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 20], 300, tmp_path / "a.json")
    plt = ModelConfig(name="plt", loops=2, hidden_size=64, num_attention_heads=4)
    old_default = ModelConfig(name="plt", loops=2, hidden_size=64, num_attention_heads=4,
                              loop=LoopConfig(hidden_scale=1.0))
    assert plt.loop.hidden_scale == 0.02
    assert identity_mismatch(run_identity(old_default, tok), run_identity(plt, tok)) == (
        "model.loop.hidden_scale: 1.0 in the checkpoint, 0.02 here")
    at_005 = ModelConfig(name="plt", loops=2, hidden_size=64, num_attention_heads=4,
                         loop=LoopConfig(hidden_scale=0.05))  # the default until 2026-12-06
    assert identity_mismatch(run_identity(at_005, tok), run_identity(plt, tok)) == (
        "model.loop.hidden_scale: 0.05 in the checkpoint, 0.02 here")
    before = {k: v for k, v in run_identity(old_default, tok).items()
              if not k.startswith("model.loop.") or k == "model.loop.gate"}
    assert identity_mismatch(before, run_identity(old_default, tok)) is None
    assert identity_mismatch(before, run_identity(plt, tok)) == (
        "model.loop.hidden_scale: 1.0 (assumed: not recorded then) in the checkpoint, 0.02 here")
    looped = ModelConfig(name="looped", loops=2, hidden_size=64, num_attention_heads=4)
    assert "model.loop.hidden_scale" not in run_identity(looped, tok)  # it does not read it


def test_identity_holds_whether_the_loops_feed_on_a_normed_state(tmp_path):
    """A looped model's default went from normed to raw: a checkpoint of before (no key,
    trained normed) is refused at the new default and resumed when the old form is asked."""
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 20], 300, tmp_path / "a.json")
    shape = dict(loops=2, hidden_size=64, num_attention_heads=4)
    looped = ModelConfig(name="looped", **shape)
    normed = ModelConfig(name="looped", loop=LoopConfig(norm_between_loops=True), **shape)
    assert not looped.normed_loop_feed and normed.normed_loop_feed
    assert ModelConfig(name="plt", **shape).normed_loop_feed
    before = {k: v for k, v in run_identity(normed, tok).items()
              if not k.startswith("model.loop.")}
    assert identity_mismatch(before, run_identity(looped, tok)) == (
        "model.loop.norm_between_loops: True (assumed: not recorded then) in the checkpoint, "
        "False here")
    assert identity_mismatch(before, run_identity(normed, tok)) is None
    assert "model.loop.norm_between_loops" not in run_identity(
        ModelConfig(name="vanilla", **shape), tok)  # one pass: nothing is fed on


def test_writer_lock_is_exclusive_and_released(tmp_path):
    first = WriterLock(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="is in use by another run"):
        WriterLock(tmp_path / "ckpt")
    first.release()
    WriterLock(tmp_path / "ckpt").release()
