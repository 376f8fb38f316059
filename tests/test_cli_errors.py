"""The command line fails cleanly: non-zero exit, one readable message, no deep traceback."""
from __future__ import annotations

from tests.helpers import DEBUG_ARGS, run_train


def traceback_frames(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().startswith('File "')]


def _assert_clean_failure(proc, *words):
    """Our message is there; no traceback frame from megatron-core or from our own code.
    (torchrun itself prints a ChildFailedError summary for any failed worker.)"""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for w in words:
        assert w in text, text[-3000:]
    bad = [f for f in traceback_frames(text) if "megatron" in f or "plt_train" in f]
    assert not bad, bad


def test_bad_parallel_config_exits_before_process_groups(tmp_path, data_cache):
    proc = run_train(tmp_path, DEBUG_ARGS + ["parallel.tensor=2", "parallel.pipeline=2"],
                     nproc=2, check=False)
    _assert_clean_failure(proc, "config error: parallel:", "not divisible", "Fix:")
    assert proc.stderr.count("config error") == 1, "printed once (rank 0), not per rank"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_heads_not_divisible_by_tp(tmp_path, data_cache):
    proc = run_train(tmp_path, DEBUG_ARGS + ["parallel.tensor=2", "model.num_query_groups=1"],
                     nproc=2, check=False)
    _assert_clean_failure(proc, "parallel.tensor", "query groups")


def test_missing_dataset(tmp_path, data_cache):
    proc = run_train(tmp_path, DEBUG_ARGS + [f"data.prefix={tmp_path}/nothing"], check=False)
    _assert_clean_failure(proc, "plt-train:", str(tmp_path / "nothing"))


def test_corrupt_dataset(tmp_path, data_cache):
    prefix = tmp_path / "corrupt"
    (tmp_path / "corrupt.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "corrupt.idx").write_bytes(b"this is not a megatron index file at all")
    (tmp_path / "corrupt.tokenizer.json").write_text("{}")
    proc = run_train(tmp_path, DEBUG_ARGS + [f"data.prefix={prefix}"], check=False)
    _assert_clean_failure(proc, "plt-train:", "corrupt")


def test_unknown_config_key(tmp_path, data_cache):
    proc = run_train(tmp_path, DEBUG_ARGS + ["model.nonexistent=1"], check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "nonexistent" in text
    assert not [f for f in traceback_frames(text) if "megatron" in f]
