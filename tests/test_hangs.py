"""The pieces of "no silent hang" that need no process group (``plt_train/runtime/hangs.py``);
the end-to-end cases are in ``tests/distributed/test_no_hang.py``."""
from __future__ import annotations

import os
import signal

from plt_train.runtime.hangs import (
    StackDumpOnSignal, communication_failure, flight_recorder_env,
)


def test_flight_recorder_env_points_into_the_run_and_keeps_what_is_set(tmp_path):
    env = {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}  # a user's choice wins
    done = flight_recorder_env(tmp_path, env)
    assert env["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight_recorder" / "rank_")
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0" and "TORCH_NCCL_DUMP_ON_TIMEOUT" not in done
    assert (tmp_path / "flight_recorder").is_dir()


def test_failed_collectives_are_told_apart_from_other_errors():
    gloo_timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer"
                                ".cc:78] Timed out waiting 8000ms for recv operation to "
                                "complete")
    gloo_lost = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] "
                             "Connection closed by peer [127.0.0.1]:16302")
    nccl = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL("
                        "SeqNum=5, OpType=ALLREDUCE) ran for 600012 milliseconds")
    assert communication_failure(gloo_timeout) == "timed out"
    assert communication_failure(nccl) == "timed out"
    assert communication_failure(gloo_lost) == "lost a peer"
    assert communication_failure(RuntimeError("shape mismatch: timed out")) is None
    assert communication_failure(TimeoutError("gloo")) is None  # not a collective's error


def test_a_stop_signal_dumps_every_stack_and_still_reaches_the_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda s, _f: received.append(s))
    try:
        dump = StackDumpOnSignal(tmp_path, 3, [signal.SIGUSR1])
        os.kill(os.getpid(), signal.SIGUSR1)
        dump.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]  # the preemption flag is still set
    text = (tmp_path / "stacks_rank3.log").read_text()
    assert "Current thread" in text and "test_a_stop_signal_dumps_every_stack" in text


def test_no_signal_leaves_no_stack_file(tmp_path):
    StackDumpOnSignal(tmp_path, 0, [signal.SIGUSR1]).close()
    assert not (tmp_path / "stacks_rank0.log").exists()
