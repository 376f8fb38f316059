"""Registers the typed schema with Hydra's ConfigStore, finds the YAML presets, and prepares
Hydra for torchrun.

YAML under ``configs/`` merges into ``base_config`` (a ``RunConfig``), so a misspelt key or a
wrong type fails at composition time.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.core.config_store import ConfigStore

from plt_train.config.schema import RunConfig


def config_dir() -> str:
    """The folder of Hydra presets: ``configs/`` at the top of the repository.  An installed
    wheel carries it inside the package as ``plt_train/configs`` (setup.py maps it there);
    a source checkout or an editable install reads it where it is."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no configs/config.yaml in {package} or beside it: a broken "
                            "install (reinstall plt_train)")


CONFIG_DIR = config_dir()


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def compose_config(overrides: list[str]) -> RunConfig:
    """The ``RunConfig`` Hydra composes from the presets and ``overrides`` (without running
    anything): for ``plt-dryrun``, tests and scripts."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def _run_id(env) -> str:
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if env.get(key) and env.get(key) != "none":
            return env[key]
    return time.strftime("%Y%m%d-%H%M%S")


def hydra_argv_for_rank(argv: list[str], env=os.environ) -> list[str]:
    """Make every rank agree on one run directory before Hydra parses the command line.

    By default each rank would create its own timestamped folder (docs/design/stack.md).  All ranks
    get ``run_dir`` if given, else ``outputs/<name>``, unless the user chose ``hydra.run.dir``;
    ranks other than 0 write no ``.hydra/`` folder or log.  The folder depends on the name only,
    as torchtitan's dump folder does, so running the same command again (after a crash, a
    Ctrl-C, a requeue or a new ``sbatch``) continues from that run's latest checkpoint.  (A run
    with another model under the same name is refused in one line by the checkpoint's
    identity check; a second run of the same name at the same time, by the writer lock.)  A
    sweep (``-m``) gets ``multirun/<name>/<run id>``: the torchrun or Slurm job id, identical
    on every rank, so two sweeps never share jobs' folders.
    """
    argv = list(argv)
    value = lambda key: next((a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")), None)
    name, run_id = value("name") or "${name}", _run_id(env)
    if value("hydra.run.dir") is None:
        argv.append(f"hydra.run.dir={value('run_dir') or f'outputs/{name}'}")
    if value("hydra.sweep.dir") is None:  # multirun (-m): one sweep folder for all ranks too
        argv.append(f"hydra.sweep.dir=multirun/{name}/{run_id}")
    if int(env.get("RANK", "0")) != 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"]
    return argv
