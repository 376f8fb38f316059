"""A CPU install without the dev extra has no Triton: everything but the kernels must work."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = r"""
import sys
sys.modules["triton"] = None  # import triton -> ImportError, as on a machine without it
import pytest, torch
import plt_train.models.plt.attention, plt_train.models.moe.layer, plt_train.inference
from plt_train.kernels import triton_unusable_reason, use_triton
from plt_train.config import ConfigError, RunConfig
from plt_train.models import validate
assert "does not import" in triton_unusable_reason("cuda")
assert not use_triton("auto", "cuda") and not use_triton("auto", "cpu")
cfg = RunConfig()
cfg.model.name, cfg.model.loops, cfg.model.loop.kernel = "plt", 2, "triton"
with pytest.raises(ConfigError, match="triton requested but triton does not import"):
    validate(cfg, world_size=1)
assert not {"plt_train.kernels.gswa", "plt_train.kernels.plt_decode"} & set(sys.modules)
print("OK")
"""


def test_the_package_imports_and_refuses_triton_cleanly_without_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
