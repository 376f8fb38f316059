"""Launch a test driver script under torchrun from the repo root (MoE distributed tests)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO, run_process_group


def torchrun_script(script: str, arg: str, nproc: int,
                    timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc script arg``; fails the test on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", script, arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = run_process_group(cmd, env, timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
