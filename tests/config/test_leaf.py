"""``plt_train.config`` is a leaf: importing it (to validate or size a config, e.g. in
``plt-dryrun``) loads none of the models, kernels, training code, megatron-core or torch."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

SCRIPT = r"""
import sys
import plt_train.config, plt_train.config.store
from plt_train.config import RunConfig, validate
validate(RunConfig(), world_size=1)
banned = ("plt_train.models", "plt_train.kernels", "plt_train.training", "plt_train.runtime",
          "plt_train.data", "plt_train.inference", "megatron", "torch")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("plt_train", "megatron", "torch")
             and m.startswith(banned)))
"""


def test_importing_the_config_loads_nothing_else_of_the_package():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_config_package_imports_nothing_from_the_rest_of_the_package():
    """The source, not just one import path: no module of plt_train/config names another
    plt_train package."""
    import re

    for path in (REPO / "plt_train" / "config").glob("*.py"):
        for line in path.read_text().splitlines():
            found = re.match(r"\s*(?:from|import)\s+(plt_train\.\w+|megatron|torch)\b", line)
            assert found is None or found.group(1) == "plt_train.config", (path.name, line)
