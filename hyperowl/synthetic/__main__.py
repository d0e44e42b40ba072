"""`python -m hyperowl.synthetic`: write a synthetic JSONL data set, or measure a model's held-out accuracy.

Examples:
  python -m hyperowl.synthetic write --out data/synth --n 100 --seed 0
  python -m hyperowl.synthetic eval --model hyperowl/assets/default-model --n 200   (or a LLaVA baseline checkpoint)
  python -m hyperowl.synthetic rag-kb --out kb --n 200   (a knowledge base for `hyperowl rag index`)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hyperowl.synthetic.accuracy import HELD_OUT_SEED, SINGLE_PICTURE_TASKS, evaluate_tasks
from hyperowl.synthetic.tasks import TASKS, TaskOptions
from hyperowl.synthetic.write import write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperowl.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write JSONL + media")
    write.add_argument("--out", required=True)
    write.add_argument("--n", type=int, default=100, help="samples per task")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--image-size", type=int, default=32)
    write.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    kb = sub.add_parser("rag-kb", help="a knowledge base of invented concepts + fresh query pictures")
    kb.add_argument("--out", required=True)
    kb.add_argument("--n", type=int, default=200, help="knowledge items")
    kb.add_argument("--queries", type=int, default=20, help="query pictures")
    kb.add_argument("--seed", type=int, default=0)
    kb.add_argument("--image-size", type=int, default=32)
    ev = sub.add_parser("eval", help="held-out exact-match accuracy per task")
    ev.add_argument("--model", required=True)
    ev.add_argument("--n", type=int, default=200, help="samples per task")
    ev.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ev.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ev.add_argument("--device", default=None)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--rag-pictures", type=int, default=4, help="retrieved pictures per rag question")
    args = parser.parse_args(argv)
    if args.command == "write":
        path = write_dataset(args.out, args.tasks, args.n, args.seed, TaskOptions(image_size=args.image_size))
        print(path)
        return 0
    if args.command == "rag-kb":
        from hyperowl.synthetic.ragkb import write_rag_kb

        print(write_rag_kb(args.out, args.n, args.queries, args.seed, args.image_size))
        return 0
    import torch

    from hyperowl.baselines import LlavaBaseline, is_llava_checkpoint
    from hyperowl.cli import resolve_device
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.processor import Owl3Processor

    device = resolve_device(args.device)
    if is_llava_checkpoint(args.model):
        model = LlavaBaseline(args.model, device)
    else:
        model = Owl3ForCausalLM.from_pretrained(args.model, dtype=torch.float32, device=device)
    processor = Owl3Processor.from_pretrained(args.model)
    opts = TaskOptions(image_size=processor.image_size, rag_pictures=(args.rag_pictures, args.rag_pictures))
    start = time.perf_counter()
    result = {"model": args.model, "n": args.n, "seed": args.seed, "rag_pictures": args.rag_pictures}
    result["accuracy"] = evaluate_tasks(model, processor, args.tasks, args.n, args.seed, opts, args.batch_size, cut_enable=False)
    cut_tasks = [t for t in args.tasks if t in SINGLE_PICTURE_TASKS]
    if cut_tasks:
        result["accuracy_cut"] = evaluate_tasks(model, processor, cut_tasks, args.n, args.seed, opts, args.batch_size, cut_enable=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
