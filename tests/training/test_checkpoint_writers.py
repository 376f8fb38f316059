"""The checkpoint writer processes are watched (issue 21, part 3): a writer that dies or never
finishes fails the save in bounded time instead of blocking its rank forever."""
from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import time

import pytest

from plt_train.training.checkpoint_writers import ResultsFile, WriterWatch, write_watched


def _buckets(tmp_path, n=2):
    # megatron's WriteBucket: (file name, storage key, (bytes items, tensor items))
    return [(str(tmp_path / f"__0_{i}.distcp"), f"key{i}", ([], [])) for i in range(n)]


def test_writers_results_come_back(tmp_path):
    out = ResultsFile()
    write_watched(WriterWatch(timeout_s=30), [], False, 0, _buckets(tmp_path), out)
    assert out.get_nowait() == {0: [], 1: []}
    assert (tmp_path / "__0_1.distcp").is_file()
    with pytest.raises(queue.Empty):  # one item, taken
        out.get_nowait()


def test_a_killed_writer_fails_the_save_at_once(tmp_path):
    out = ResultsFile()
    start = time.monotonic()
    write_watched(WriterWatch(timeout_s=600, kill_first_writer=True), [], False, 3,
                  _buckets(tmp_path), out)
    error = out.get_nowait()
    assert time.monotonic() - start < 10  # not the 600 s deadline
    assert isinstance(error, RuntimeError)
    assert "checkpoint writer 0 of rank 3" in str(error)
    assert "writing __0_0.distcp was killed by SIGKILL" in str(error)


def test_a_writer_past_the_deadline_is_killed_and_fails_the_save(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data",
                        staticmethod(lambda *a, **k: time.sleep(120)))  # a dead file system
    out = ResultsFile()
    start = time.monotonic()
    write_watched(WriterWatch(timeout_s=1), [], False, 0, _buckets(tmp_path, 1), out)
    error = out.get_nowait()
    assert time.monotonic() - start < 15
    assert isinstance(error, TimeoutError)
    assert "was still writing after 1 s (checkpoint.save_timeout_s)" in str(error)


def test_megatron_own_writer_still_blocks_forever_on_a_killed_writer(tmp_path):
    """Why ``write_watched`` exists: megatron-core 0.16.1's writer waits on
    ``count_queue.join()`` without a timeout.  If this starts failing, megatron fixed it and
    ``checkpoint_writers.py`` can go."""
    script = textwrap.dedent(f"""
        import os, queue, signal
        from megatron.core.dist_checkpointing.strategies.filesystem_async import (
            FileSystemWriterAsync as W)
        W.write_preloaded_data = staticmethod(lambda *a, **k: os.kill(os.getpid(), 9))
        W.write_preloaded_data_multiproc([], False, 0, [({str(tmp_path / 'f')!r}, 'k', ([], []))],
                                         queue.Queue())
        print("returned")
    """)
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=8)
