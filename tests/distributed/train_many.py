"""Several short trainings through the main training loop in ONE torchrun launch.

    torchrun --standalone --nproc-per-node=4 tests/distributed/train_many.py RUNS.json

``RUNS.json`` maps a run directory to its Hydra overrides.  Each run is composed exactly like
``plt-train`` composes it (same config directory, same schema) and goes through
``plt_train.train.run``; between runs megatron's model-parallel groups are torn down and the
next run builds its own layout on the same default process group (as a Hydra multirun under
torchrun does).  This saves the ~5 s interpreter + megatron import per launch that separate
``torchrun`` calls would pay for every layout.  Before each run the logging rank (the last)
prints ``[train_many] RUN_DIR``, so ``tests.helpers.train_many`` can hand each run its own
part of the output; rank 0 saves the run's config where Hydra would
(``RUN_DIR/.hydra/config.yaml``), for ``plt-generate`` and ``plt-eval``.  (``tests.helpers.train_many`` launches it.)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MARKER = "[train_many] "


def main(runs_path: str) -> None:
    from omegaconf import OmegaConf

    from plt_train.config.store import compose_config
    from plt_train.runtime import destroy_distributed
    from plt_train.train import run  # the entry point's loop, as Hydra's multirun calls it

    with open(runs_path) as f:
        runs = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for run_dir, overrides in runs.items():
        if rank == world - 1:
            print(f"{MARKER}{run_dir}", flush=True)
        cfg = compose_config(overrides)
        if rank == 0:  # what Hydra leaves for plt-generate / plt-eval
            (Path(run_dir) / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(cfg), Path(run_dir) / ".hydra" / "config.yaml")
        try:
            run(cfg, run_dir)
        finally:
            destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
