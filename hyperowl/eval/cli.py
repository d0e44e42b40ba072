"""Evaluate checkpoints on local benchmark files: MMBench, multi-image, video MC, the distractor test.

Examples:
  hyperowl eval run mmbench --data MMBench_DEV_EN.tsv --out runs/mmbench
  hyperowl eval run distractor --data MMBench_DEV_EN.tsv --out runs/distractor --levels 1,5,10,20,50
  hyperowl eval run longvideobench --data LongVideoBench/lvb_val.json --out runs/lvb --max-frames 64
  hyperowl eval run videomme --data Video-MME/videomme/test-00000-of-00001.parquet --out runs/vmme
  hyperowl eval run mvbench --data MVBench/json --out runs/mvbench
  torchrun --nproc-per-node 4 -m hyperowl.cli eval run mmbench --data ... --out ...   (sharded)
  hyperowl eval report runs/distractor runs/distractor-baseline --out reports/distractor
  hyperowl eval make-synthetic --out data/synthetic-bench
  hyperowl eval distractor-set --data MMBench_DEV_EN.tsv --out distractor_set.json

--model also takes a transformers LLaVA checkpoint (the token-concatenation baseline,
hyperowl.baselines, trained by benchmarks/train_baseline.py), answered through the same prompts and scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hyperowl.baselines import LlavaBaseline, is_llava_checkpoint
from hyperowl.cli import add_model_arguments, load_model_and_processor, resolve_device
from hyperowl.errors import HyperowlError
from hyperowl.eval.data import LOADERS, load_benchmark, load_mmbench_tsv
from hyperowl.eval.distractor import DEFAULT_LEVELS, DEFAULT_VARIANTS, DistractorSet, build_distractor_set
from hyperowl.eval.report import load_summaries, markdown_report, write_report
from hyperowl.eval.runner import CUT_MODES, RunOptions, init_distributed, run_requests
from hyperowl.eval.scoring import summarize
from hyperowl.eval.tasks import EvalRequest, build_requests
from hyperowl.hub import DEFAULT_MODEL

BENCHMARKS = (*LOADERS, "distractor")

#: Settings a resumed run must share with the run that made the folder.
RUN_FILE = "run.json"
DISTRACTOR_SET_FILE = "distractor_set.json"


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated integers, got {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be integers >= 1, got {text!r}")
    return levels


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _add_distractor_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distractor test (when drawing a new set from an MMBench TSV)")
    group.add_argument(
        "--levels", type=_levels, default=list(DEFAULT_LEVELS), help="images per prompt, e.g. 1,5,10,20,50,100,200,400"
    )
    group.add_argument("--variants", type=_positive, default=DEFAULT_VARIANTS, help="prompts per question and level")
    group.add_argument("--seed", type=int, default=0, help="seed of the distractor draw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="eval_command", required=True)

    run = sub.add_parser("run", help="run a checkpoint on a benchmark (resumable, torchrun-shardable)")
    add_model_arguments(run)
    run.add_argument("benchmark", choices=BENCHMARKS)
    run.add_argument(
        "--data",
        type=Path,
        required=True,
        help="benchmark file (TSV/JSON/parquet), MVBench json folder, or a saved distractor set",
    )
    run.add_argument(
        "--media-root", type=Path, default=None, help="folder of images/videos (default: next to --data as published)"
    )
    run.add_argument(
        "--mmbench",
        type=Path,
        default=None,
        help="the MMBench TSV a saved distractor set was drawn from (default: its recorded path)",
    )
    run.add_argument("--out", type=Path, required=True, help="run folder: predictions.jsonl, summary.json, report.md, plots")
    run.add_argument("--label", default=None, help="name of this run in tables (default: the checkpoint folder name)")
    run.add_argument("--limit", type=_positive, default=None, help="only the first N questions")
    circular = run.add_mutually_exclusive_group()
    circular.add_argument(
        "--circular",
        dest="circular",
        action="store_true",
        default=None,
        help="all option rotations must be right (default for mmbench)",
    )
    circular.add_argument(
        "--no-circular", dest="circular", action="store_false", help="published option order only (default for other benchmarks)"
    )
    _add_distractor_arguments(run)
    group = run.add_argument_group("inference")
    group.add_argument("--batch-size", type=_positive, default=8, help="conversations per generate call")
    group.add_argument("--max-batch-images", type=_positive, default=256, help="most images per generate call")
    group.add_argument("--max-new-tokens", type=_positive, default=16)
    group.add_argument("--max-frames", type=_positive, default=16, help="most frames sampled per video")
    group.add_argument("--fps", type=_positive_float, default=1.0, help="frames per second sampled before the --max-frames cap")
    group.add_argument("--cut", choices=CUT_MODES, default="auto", help="cut images into tiles: auto = single-image prompts only")
    group.add_argument("--vision-chunk-size", type=_positive, default=None, help="images per vision-tower call")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")

    draw = sub.add_parser("distractor-set", help="draw and save a distractor test from an MMBench TSV")
    draw.add_argument("--data", type=Path, required=True, help="MMBench-format TSV")
    draw.add_argument("--out", type=Path, required=True, help="JSON file to write")
    draw.add_argument(
        "--limit", type=_positive, default=None, help="only the first N questions (distractors still come from all)"
    )
    _add_distractor_arguments(draw)

    report = sub.add_parser("report", help="tables and plots comparing run folders")
    report.add_argument("runs", nargs="+", type=Path, help="run folders (or summary.json files)")
    report.add_argument("--labels", default=None, help="comma-separated names replacing the runs' labels")
    report.add_argument("--out", type=Path, required=True, help="folder for report.md, summary.json and plots")

    synth = sub.add_parser("make-synthetic", help="write synthetic MMBench TSV, multi-image JSON and video MC files")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--questions", type=_positive, default=300, help="MMBench-format questions")
    synth.add_argument("--multi-image", type=_positive, default=100, help="two-picture questions")
    synth.add_argument("--videos", type=_positive, default=60, help="video questions")
    synth.add_argument("--seed", type=int, default=None, help="sample seed (default: the synthetic held-out seed)")


def run(args: argparse.Namespace) -> int:
    return {
        "run": _run,
        "distractor-set": _distractor_set,
        "report": _report,
        "make-synthetic": _make_synthetic,
    }[args.eval_command](args)


def _draw(data: Path, limit: int | None, levels: list[int], variants: int, seed: int, out: Path) -> DistractorSet:
    items = load_mmbench_tsv(data)
    drawn = build_distractor_set(
        items, str(data), levels, variants, seed, limit, log=lambda message: print(message, file=sys.stderr)
    )
    drawn.save(out)
    return drawn


def _distractor_set(args: argparse.Namespace) -> int:
    drawn = _draw(args.data, args.limit, args.levels, args.variants, args.seed, args.out)
    questions = len({entry.question for entry in drawn.entries})
    print(
        f"wrote {args.out}: {questions} questions x levels {drawn.levels} x {drawn.variants} variants = {len(drawn.entries)} prompts"
    )
    return 0


def _distractor_requests(args: argparse.Namespace) -> list[EvalRequest]:
    """Requests of a saved set (``--data`` JSON), or of a set drawn from ``--data`` TSV and saved in
    the run folder (reused when the run resumes)."""
    saved = args.out / DISTRACTOR_SET_FILE
    if args.data.suffix == ".json":
        drawn = DistractorSet.load(args.data)
        source = args.mmbench or Path(drawn.source)
    elif saved.is_file():
        drawn, source = DistractorSet.load(saved), args.data
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        drawn, source = _draw(args.data, args.limit, args.levels, args.variants, args.seed, saved), args.data
    return drawn.requests(load_mmbench_tsv(source))


def _requests(args: argparse.Namespace) -> list[EvalRequest]:
    if args.benchmark == "distractor":
        return _distractor_requests(args)
    items = load_benchmark(args.benchmark, args.data, args.media_root)
    if args.limit is not None:
        items = items[: args.limit]
    circular = args.circular if args.circular is not None else args.benchmark == "mmbench"
    return build_requests(items, circular)


def _check_run_file(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings, or check that a resumed run uses the same ones."""
    path = out / RUN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise HyperowlError(f"{out} holds a run with other settings ({details}); use another --out or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """An mPLUG-Owl3 checkpoint, or a transformers LLaVA one (the token-concatenation baseline)."""
    path = args.model or DEFAULT_MODEL
    if not is_llava_checkpoint(path):
        return load_model_and_processor(args)
    import torch

    from hyperowl.processing.processor import Owl3Processor

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return LlavaBaseline(path, resolve_device(args.device), dtype), Owl3Processor.from_pretrained(path)


def _run(args: argparse.Namespace) -> int:
    dist = init_distributed()
    options = RunOptions(
        batch_size=args.batch_size,
        max_batch_images=args.max_batch_images,
        max_new_tokens=args.max_new_tokens,
        max_frames=args.max_frames,
        fps=args.fps,
        cut=args.cut,
        vision_chunk_size=args.vision_chunk_size,
        progress=not args.no_progress,
    )
    model_path = args.model or DEFAULT_MODEL
    settings = {
        "benchmark": args.benchmark,
        "data": str(args.data.resolve()),
        "model": str(Path(model_path).resolve()),
        "limit": args.limit,
        "circular": args.circular,
        "max_frames": args.max_frames,
        "fps": args.fps,
        "cut": args.cut,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.benchmark == "distractor" and args.data.suffix != ".json":
        settings.update(levels=args.levels, variants=args.variants, seed=args.seed)
    if dist.rank == 0:
        _check_run_file(args.out, settings)
        requests = _requests(args)
    dist.barrier()
    if dist.rank != 0:
        requests = _requests(args)
    import torch

    if args.device is None and dist.world_size > 1 and torch.cuda.is_available():
        args.device = f"cuda:{dist.local_rank}"
    model, processor = _load_model(args)
    records = run_requests(model, processor, requests, args.out, options, dist)
    if records is None:
        return 0
    label = args.label or Path(model_path).name
    summary = summarize(records, args.benchmark, label)
    written = write_report([summary], args.out)
    print(markdown_report([summary]))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if not any(p.suffix == ".png" for p in written) and (summary.levels or summary.categories):
        print("plots skipped: pip install matplotlib", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    summaries = load_summaries(args.runs)
    if args.labels:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(summaries):
            raise HyperowlError(f"--labels has {len(labels)} names for {len(summaries)} runs")
        for summary, label in zip(summaries, labels):
            summary.label = label
    written = write_report(summaries, args.out)
    print(markdown_report(summaries))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from hyperowl.synthetic.accuracy import HELD_OUT_SEED
    from hyperowl.synthetic.benchmark_files import write_synthetic_benchmarks

    seed = HELD_OUT_SEED if args.seed is None else args.seed
    files = write_synthetic_benchmarks(args.out, args.questions, args.multi_image, args.videos, seed)
    print(f"mmbench:        {files.mmbench}")
    print(f"multi-image:    {files.multi_image}")
    print(f"longvideobench: {files.longvideobench}")
    return 0
