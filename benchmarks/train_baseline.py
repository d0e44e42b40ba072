"""Train the token-concatenation baseline on the same synthetic recipe as an mPLUG-Owl3 model.

The baseline is `common.llava_baseline`: transformers' `LlavaForConditionalGeneration` with the
recipe's vision tower and Qwen2 LLM (the same sizes, tokenizer, initial weights, data order,
optimizer, schedule and steps) and a 2-layer MLP projector, every visual token inserted into the
LLM sequence. Only the hyper layers' cross-attention modules are missing, and with them the
recipe's `recency_prior` (an initialisation of those modules; the LLM starts from the same weights).
The result is a transformers checkpoint + tokenizer that `hyperowl eval run --model DIR` scores like
any model.

    python -m benchmarks.train_baseline --config recipes/default-model.yaml --out runs/baseline-llava
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.common import llava_baseline
from hyperowl.eval.baseline import expand_image_tokens
from hyperowl.processing.processor import IGNORE_INDEX
from hyperowl.train.config import TrainConfig
from hyperowl.train.data import MicroBatches
from hyperowl.train.model import build_from_scratch
from hyperowl.train.trainer import build_optimizer, lr_lambda, make_dataset, seed_everything, token_loss_sum


def train_baseline(cfg: TrainConfig, out: Path, progress: bool = True) -> list[float]:
    """Train the LLaVA baseline of the from-scratch recipe `cfg`; write it to `out`. Returns the step losses."""
    if cfg.init_from is not None or cfg.synthetic_tasks is None:
        raise SystemExit("the baseline trains from scratch on synthetic tasks: give a recipe without init_from/train_file")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    owl, processor = build_from_scratch(replace(cfg, recency_prior=0.0))
    llava = llava_baseline(owl, image_token_id=processor.image_token_id).train()
    for name, param in llava.named_parameters():
        # Like the recipe: the vision tower trains only with train_vision; its unused post_layernorm never does.
        unused_vision = "vision_tower" in name and (not cfg.train_vision or "post_layernorm" in name)
        param.requires_grad_(not unused_vision)
    vision = owl.config.vision_config
    tokens_per_image = vision.tokens_per_image
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    micro = MicroBatches(
        make_dataset(cfg, vision.image_size), processor, cfg.cut_enable, cfg.batch_size, cfg.grad_accum, 0, 1,
        cfg.seed, cfg.steps, cfg.length_groups,
    )
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="train baseline", disable=not progress)
    began = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as metrics:
        for step in range(cfg.steps):
            batches = [b for k in range(cfg.grad_accum) for b in micro[step * cfg.grad_accum + k]]
            total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            loss_sum = 0.0
            for batch in batches:
                ids, mask, labels = expand_image_tokens(
                    batch["input_ids"], batch["attention_mask"], batch["labels"], processor.image_token_id,
                    tokens_per_image, processor.pad_token_id,
                )
                logits = llava(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
                loss, _ = token_loss_sum(logits, labels)
                (loss / total).backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum / total)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = {"step": step + 1, "loss": losses[-1], "elapsed_s": time.perf_counter() - began}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
    bar.close()
    llava.eval().save_pretrained(str(out))
    processor.save_pretrained(out)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a from-scratch synthetic recipe (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the LLaVA checkpoint + tokenizer")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, {"steps": args.steps} if args.steps else None)
    losses = train_baseline(cfg, args.out)
    print(f"trained {len(losses)} steps; final loss {losses[-1]:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
