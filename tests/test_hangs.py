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


def test_a_launch_past_its_timeout_is_stopped_gently_and_reported_with_its_stacks(tmp_path):
    """The tests' launcher (``tests/helpers.run_process_group``): past the timeout the
    session gets SIGTERM before SIGKILL, so ``plt_train.train``'s ranks can write their
    stacks, and the failure carries those stacks, the output and what was still running."""
    import sys
    import textwrap

    import pytest

    from tests.helpers import run_process_group

    child = textwrap.dedent("""
        import pathlib, signal, sys, time
        run_dir = pathlib.Path(sys.argv[1].split("=", 1)[1])
        def stop(*_):
            (run_dir / "stacks_rank0.log").write_text("stuck in wait_for_peer")
            sys.exit(1)
        signal.signal(signal.SIGTERM, stop)
        print("started", flush=True)
        time.sleep(60)
    """)
    cmd = [sys.executable, "-c", child, f"run_dir={tmp_path}"]
    with pytest.raises(AssertionError) as failure:
        run_process_group(cmd, dict(os.environ), timeout=3)
    report = str(failure.value)
    assert "timed out after 3 s (exit 1 after SIGTERM)" in report
    assert "started" in report and "stuck in wait_for_peer" in report
    assert "python" in report.split("--- still running at the timeout")[1]
