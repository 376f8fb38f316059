"""``plt-eval``'s bad input: one line on stderr and exit code 2, before a model is loaded.

(Its numbers: ``tests/distributed/test_plt_parity.py`` checks them against the evaluation
logged during training, from a checkpoint trained at DP=2.)
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, one_process_env

pytest.importorskip("lm_eval")


@pytest.mark.parametrize("args, words", [
    (["--tasks", "plt_tiny_mc"], "plt-eval: run directory {run} does not exist"),
    (["--tasks", "plt_tiny_mc,no_such_task"], "plt-eval: unknown task 'no_such_task'"),
    (["--tasks", "plt_tiny_mc", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    run = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "plt_train.evaluate", str(run), *args],
                          cwd=REPO, env=one_process_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert words.format(run=run) in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
