"""Train the token-concatenation baseline on the same synthetic recipe as an mPLUG-Owl3 model.

`hyperowl.baselines.train_baseline`: transformers' `LlavaForConditionalGeneration` with the recipe's
vision tower and Qwen2 LLM and a 2-layer MLP projector, every visual token inserted into the LLM
sequence. The result is a transformers checkpoint + tokenizer that `hyperowl eval run --model DIR`
scores like any model.

    python -m benchmarks.train_baseline --config recipes/default-model.yaml --out runs/baseline-llava
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hyperowl.baselines import train_baseline
from hyperowl.errors import HyperowlError
from hyperowl.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a from-scratch synthetic recipe (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the LLaVA checkpoint + tokenizer")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.from_yaml(args.config, {"steps": args.steps} if args.steps else None)
        losses = train_baseline(cfg, args.out)
    except HyperowlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {len(losses)} steps; final loss {losses[-1]:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
