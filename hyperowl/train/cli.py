"""Train or fine-tune mPLUG-Owl3 from a YAML recipe (hyper-only, full or LoRA; DDP/FSDP under torchrun).

Examples:
  hyperowl train --config recipes/default-model.yaml
  hyperowl train --config recipes/lora.yaml --init_from ./owl3-checkpoint --train_file data/train.jsonl --steps 500
  torchrun --nproc_per_node 2 -m hyperowl.train.cli --config recipes/full.yaml
Every recipe key is also a flag (`--key value`; lists and dicts as JSON) that overrides the YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from hyperowl.errors import HyperowlError
from hyperowl.train.config import TrainConfig, flag_parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    group = parser.add_argument_group("recipe keys (override the YAML)")
    for f in dataclasses.fields(TrainConfig):
        group.add_argument(f"--{f.name}", dest=f"set_{f.name}", type=flag_parser(f.name), default=argparse.SUPPRESS, metavar=f.name.upper())


def run(args: argparse.Namespace) -> int:
    from hyperowl.train.trainer import train

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_")}
    cfg = TrainConfig.from_yaml(args.config, overrides) if args.config else TrainConfig.from_dict(overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    began = time.perf_counter()
    result = train(cfg)
    if result.skipped_rows:
        print(f"skipped {result.skipped_rows} bad row(s)", file=sys.stderr)
    if result.losses:
        print(f"trained {len(result.losses)} step(s) in {time.perf_counter() - began:.0f}s; final loss {result.losses[-1]:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hyperowl.train.cli` (what torchrun starts on every rank)."""
    parser = argparse.ArgumentParser(prog="hyperowl train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except HyperowlError as exc:
        print(f"hyperowl train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
