"""Check a configuration for a cluster without starting any process: ``plt-dryrun``.

    plt-dryrun --world-size 1024 model=1b parallel.tensor=8 parallel.pipeline=4 \
        train.global_batch_size=1024 train.micro_batch_size=2

Validates the config for that many ranks (the same checks ``plt_train.train`` runs before
starting process groups) and prints the per-rank plan: sizes, layers per stage, parameters and
a memory estimate (see ``plt_train.models.plan``).  Exit status 2 on an invalid config.
"""
from __future__ import annotations

import argparse
import sys

from plt_train.config import ConfigError
from plt_train.config.store import compose_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plt-dryrun", description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="tokenizer vocabulary (before padding)")
    parser.add_argument("--fp32", action="store_true", help="size for fp32 instead of bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="size activations for this device's kernels (default cuda)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for plt_train.train")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.vocab_size < 1:
        parser.error(f"--vocab-size must be >= 1, got {args.vocab_size}")
    from plt_train.runtime.quiet import quiet_start

    quiet_start()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(args.overrides)
        from plt_train.models.plan import format_plan, plan
        result = plan(cfg, args.world_size, args.vocab_size, bf16=not args.fp32,
                      device=args.device)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        # Hydra / omegaconf: an unknown key, a wrong type or an unknown choice (the cause
        # names the key and the allowed values).
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        print(f"plt-dryrun: {err}{cause}".replace("\n", " "), file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
