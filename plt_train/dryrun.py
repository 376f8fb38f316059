"""Check a configuration for a cluster without starting any process: ``plt-dryrun``.

    plt-dryrun --world-size 1024 model=1b parallel.tensor=8 parallel.pipeline=4 \
        train.global_batch_size=1024 train.micro_batch_size=2

Validates the config for that many ranks (the same checks ``plt_train.train`` runs before
starting process groups) and prints the per-rank plan: sizes, layers per stage, parameters and
a memory estimate (see ``plt_train.config.plan``).  Exit status 2 on an invalid config.
"""
from __future__ import annotations

import argparse
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from plt_train.config import ConfigError
from plt_train.config.plan import format_plan, plan
from plt_train.config.store import register_configs
from plt_train.train import CONFIG_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plt-dryrun", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="tokenizer vocabulary (before padding)")
    parser.add_argument("--fp32", action="store_true", help="size for fp32 instead of bf16")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for plt_train.train")
    args = parser.parse_args(argv)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=args.overrides))
    try:
        result = plan(cfg, args.world_size, args.vocab_size, bf16=not args.fp32)
    except ConfigError as err:
        print(f"plt-dryrun: {err}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
