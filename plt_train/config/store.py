"""Registers the typed schema with Hydra's ConfigStore and prepares Hydra for torchrun.

YAML under ``configs/`` merges into ``base_config`` (a ``RunConfig``), so a misspelt key or a
wrong type fails at composition time.
"""
from __future__ import annotations

import os
import time

from hydra.core.config_store import ConfigStore

from plt_train.config.schema import RunConfig


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def _run_id(env) -> str:
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if env.get(key) and env.get(key) != "none":
            return env[key]
    return time.strftime("%Y%m%d-%H%M%S")


def hydra_argv_for_rank(argv: list[str], env=os.environ) -> list[str]:
    """Make every rank agree on one run directory before Hydra parses the command line.

    By default each rank would create its own timestamped folder (STACK-FACTS.md).  All ranks
    get ``run_dir`` if given, else ``outputs/<name>/<run id>`` (the torchrun or Slurm job id,
    identical on every rank), unless the user chose ``hydra.run.dir``; ranks other than 0 write
    no ``.hydra/`` folder or log.
    """
    argv = list(argv)
    value = lambda key: next((a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")), None)
    name, run_id = value("name") or "${name}", _run_id(env)
    if value("hydra.run.dir") is None:
        argv.append(f"hydra.run.dir={value('run_dir') or f'outputs/{name}/{run_id}'}")
    if value("hydra.sweep.dir") is None:  # multirun (-m): one sweep folder for all ranks too
        argv.append(f"hydra.sweep.dir=multirun/{name}/{run_id}")
    if int(env.get("RANK", "0")) != 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"]
    return argv
