"""``scripts/loop_input_scales.py``: the measurement behind the looped model's raw feed
(docs/benchmarks.md, issue 19 part 4), end to end at a small width."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, one_process_env


def test_the_normed_feed_leaves_a_looped_models_second_loop_nearly_still(tmp_path):
    out = tmp_path / "scales.json"
    proc = subprocess.run([sys.executable, "scripts/loop_input_scales.py", "--hidden", "64",
                           "--layers", "1", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=one_process_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = {(r["form"], r["loop"]): r["ratio"] for r in json.loads(out.read_text())}
    assert len(ratio) == 8  # four forms, two loops each
    first = ratio[("looped, raw (default)", 1)]
    assert ratio[("looped, normed", 2)] < 0.1 * first
    for form in ("looped, raw (default)", "plt, normed x 0.05 (default)", "plt, raw x 1.0"):
        assert ratio[(form, 2)] > 0.25 * first, form
    assert "looped, normed" in proc.stdout and "update/input" in proc.stdout
