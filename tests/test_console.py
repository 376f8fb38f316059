"""Ranks that share one pipe never cut into each other's lines (``plt_train.runtime.console``).

CI on 2026-12-06 lost rank 0's one-line error inside the last rank's warning: ``print`` writes
the text and its newline in two calls, and another rank's line landed between them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import plt_train.runtime.console as console

LINES, WIDTH = 3000, 300  # ~1 MB per writer: the two writers overlap for many lines

WRITER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("console", {str(Path(console.__file__))!r})
console = importlib.util.module_from_spec(spec)
spec.loader.exec_module(console)  # the module alone: starts in milliseconds, without torch
tag = sys.argv[1]
for i in range({LINES}):
    console.say(f"{{tag}} {{i:05d}} " + tag * {WIDTH}, sys.stderr)
"""


def test_lines_of_two_processes_on_one_pipe_stay_whole():
    read_end, write_end = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-u", "-c", WRITER, tag], stderr=write_end,
                                stdout=subprocess.DEVNULL) for tag in "ab"]
    os.close(write_end)  # one pipe for both, as torchrun gives its workers
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert [w.wait() for w in writers] == [0, 0]
    expected = {f"{tag} {i:05d} " + tag * WIDTH for tag in "ab" for i in range(LINES)}
    broken = [x[:40] for x in lines if x not in expected]
    assert not broken, f"{len(broken)} cut lines, e.g. {broken[:3]}"
    assert len(lines) == 2 * LINES
