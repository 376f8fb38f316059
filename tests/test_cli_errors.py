"""The command line fails cleanly: non-zero exit, one readable message, no deep traceback."""
from __future__ import annotations

from tests.helpers import DEBUG_ARGS, assert_clean_failure, run_train, traceback_frames

_assert_clean_failure = assert_clean_failure


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


def test_unexpected_error_is_one_line_with_the_traceback_in_the_run_dir(tmp_path, data_cache):
    """An error no check anticipates (here the data cache path is a file, so building the
    embedded corpus fails on every rank) ends as one line naming the exception and where it
    happened, and each rank's full traceback lands in the run directory."""
    bad = tmp_path / "cache"
    bad.write_text("a file where the data cache directory should be")
    proc = run_train(tmp_path / "run", DEBUG_ARGS, nproc=2, check=False,
                     env={"PLT_TRAIN_CACHE": str(bad)})
    _assert_clean_failure(proc, "plt-train: ", "error_rank*.log")
    line = [x for x in proc.stderr.splitlines() if x.startswith("plt-train:")]
    assert len(line) == 1 and " (at " in line[0], proc.stderr[-3000:]
    logs = sorted((tmp_path / "run").glob("error_rank*.log"))
    assert [p.name for p in logs] == ["error_rank0.log", "error_rank1.log"]
    assert all("Traceback (most recent call last)" in p.read_text() for p in logs)
