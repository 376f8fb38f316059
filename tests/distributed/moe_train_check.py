"""Several short trainings through the main training loop in ONE torchrun launch.

    torchrun --standalone --nproc-per-node=4 tests/distributed/moe_train_check.py RUNS.json

``RUNS.json`` maps a run directory to its Hydra overrides.  Each run is composed exactly like
``plt-train`` composes it (same config directory, same schema) and goes through
``plt_train.train.run``; between runs megatron's model-parallel groups are torn down and the
next run builds its own layout on the same default process group (as a Hydra multirun under
torchrun does).  This saves the ~5 s interpreter + megatron import per launch that separate
``torchrun`` calls would pay for every layout.
"""
from __future__ import annotations

import json
import sys


def main(runs_path: str) -> None:
    from plt_train.config.store import compose_config
    from plt_train.runtime import destroy_distributed
    from plt_train.train import run  # the entry point's loop, as Hydra's multirun calls it

    with open(runs_path) as f:
        runs = json.load(f)
    for run_dir, overrides in runs.items():
        cfg = compose_config(overrides)
        try:
            run(cfg, run_dir)
        finally:
            destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
