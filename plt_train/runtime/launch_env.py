"""Processes started by ``srun`` (one task per rank, e.g. Hydra's submitit launcher) instead of
``torchrun``: derive torch's ``env://`` rendezvous variables from Slurm's, as Megatron-LM and
Lightning do.  Under torchrun (``WORLD_SIZE`` already set) or outside a job step this does
nothing.
"""
from __future__ import annotations

import os
import subprocess


def _first_node_address(nodelist: str) -> str:
    """The first node's ``NodeAddr`` (what resolves even when host names do not)."""
    try:
        head = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True, timeout=30).stdout.split()[0]
        info = subprocess.run(["scontrol", "show", "node", head], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "127.0.0.1"
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return head


def set_torch_env_from_slurm(env=os.environ) -> bool:
    """Set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_PORT (and MASTER_ADDR unless given) inside
    an srun step whose tasks are the ranks.  Returns True if it did.

    ``SLURM_STEP_NUM_TASKS`` marks a job step (the batch script itself has none), so a plain
    ``python`` in an sbatch script is not mistaken for one rank of many; ``TORCHELASTIC_RUN_ID``
    marks torchrun's workers, whose variables torchrun already set.  Inside a step, Slurm's
    values win over any inherited from the submitting shell (a stale WORLD_SIZE=1 there would
    make every task rank 0 of its own world).
    """
    if "TORCHELASTIC_RUN_ID" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    env.setdefault("MASTER_ADDR", _first_node_address(env.get("SLURM_STEP_NODELIST", "")))
    return True
