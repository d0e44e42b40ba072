"""Chat about images, image sets and videos, one question or an interactive multi-turn session.

Examples:
  hyperowl chat --image cat.jpg "What is in the picture?"
  hyperowl chat --video movie.mp4 --max-frames 64 "What happens at the end?"
  hyperowl chat --video film.mkv --max-frames 400 --video-sampling keyframe "Who is in the film?"
  hyperowl chat --image a.png --image b.png          (interactive; /image P and /video P add media, /quit ends)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from hyperowl.cli import add_model_arguments, load_model_and_processor
from hyperowl.config import GenerationConfig
from hyperowl.engine.conversation import ChatSession
from hyperowl.engine.sampling import REPETITION_PENALTY_RANGE, SEED_RANGE, SamplingParams
from hyperowl.errors import HyperowlError
from hyperowl.processing.video import DEFAULT_SAMPLING

#: Answer length when neither --max-new-tokens nor the model's generation config sets one.
DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("question", nargs="?", help="ask once and exit; without it, chat interactively")
    parser.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    parser.add_argument("--video", action="append", default=[], type=Path, help="video file (repeatable)")
    parser.add_argument("--max-frames", type=int, default=None, help="most frames sampled per video")
    parser.add_argument("--fps", type=float, default=None, help="frames per second sampled before the --max-frames cap")
    parser.add_argument(
        "--video-sampling",
        choices=["exact", "keyframe"],
        default=DEFAULT_SAMPLING,
        help="exact: the sampled frames themselves (seek to the keyframe before each, decode to it); "
        "keyframe: the keyframe nearest to each (decodes one frame per sample, much faster on long films)",
    )
    parser.add_argument("--no-cut", action="store_true", help="do not cut images into tiles (global view only)")
    parser.add_argument("--system", default=None, help="system prompt")
    defaults = "default: the model's generation_config.json"
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"{defaults}, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=None, help=f"0 = greedy, > 0 samples ({defaults})")
    parser.add_argument("--top-p", type=float, default=None, help=defaults)
    parser.add_argument("--top-k", type=int, default=None, help=f"0 = off ({defaults})")
    parser.add_argument("--repetition-penalty", type=float, default=None, help=defaults)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--vision-chunk-size", type=int, default=None, help="images encoded per vision-tower batch")
    parser.add_argument("--stats", action="store_true", help="print first-token latency and speed after each answer")


def check_flags(args: argparse.Namespace) -> None:
    """`HyperowlError` naming the first flag with a value out of range (before any model is loaded)."""
    low, high = REPETITION_PENALTY_RANGE
    checks = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1, "must be >= 1"),
        ("--max-frames", args.max_frames, args.max_frames is None or args.max_frames >= 1, "must be >= 1"),
        ("--fps", args.fps, args.fps is None or args.fps > 0, "must be > 0"),
        ("--temperature", args.temperature, args.temperature is None or 0 <= args.temperature < math.inf, "must be >= 0 and finite (0 = greedy)"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "must be in (0, 1]"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 0, "must be >= 0 (0 = off)"),
        (
            "--repetition-penalty",
            args.repetition_penalty,
            args.repetition_penalty is None or low <= args.repetition_penalty <= high,
            f"must be in [{low:g}, {high:g}]",
        ),
        ("--seed", args.seed, args.seed is None or SEED_RANGE[0] <= args.seed <= SEED_RANGE[1], "must be in [-2**63, 2**64 - 1]"),
        ("--vision-chunk-size", args.vision_chunk_size, args.vision_chunk_size is None or args.vision_chunk_size >= 1, "must be >= 1"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            raise HyperowlError(f"{flag} {rule}, got {value}")
    if args.question is not None and not args.question.strip():
        raise HyperowlError("the question is empty; leave it out to chat interactively")


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    overrides = {"cut_enable": not args.no_cut}
    if args.max_frames is not None:
        overrides["max_frames"] = args.max_frames
    if args.fps is not None:
        overrides["video_fps"] = args.fps
    model, processor = load_model_and_processor(args, **overrides)
    params = sampling_params(args, model.generation_config)
    session = ChatSession(
        model,
        processor,
        system=args.system,
        params=params,
        vision_chunk_size=args.vision_chunk_size,
        video_sampling=args.video_sampling,
    )
    images, videos = [str(p) for p in args.image], [str(p) for p in args.video]
    if args.question is not None:
        answer(session, args.question, images, videos, args.stats)
        return 0
    print("hyperowl chat: type a question; /image PATH or /video PATH attaches media to the next question; /quit ends.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith(("/image ", "/video ")):
            (images if line.startswith("/image") else videos).append(line.split(" ", 1)[1].strip())
            continue
        if not line:
            continue
        try:
            answer(session, line, images, videos, args.stats, prefix="owl> ")
        except HyperowlError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
        images, videos = [], []


def sampling_params(args: argparse.Namespace, defaults: GenerationConfig) -> SamplingParams:
    """The flags given over the model's generation defaults; a given --temperature also sets sampling
    on (> 0) or off (0)."""
    values = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **defaults.sampling_kwargs()}
    flags = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.temperature is not None:
        values["do_sample"] = args.temperature > 0
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        raise HyperowlError(f"bad sampling option: {exc}") from exc


def answer(session: ChatSession, question: str, images: list[str], videos: list[str], stats: bool, prefix: str = "") -> None:
    """Stream the answer to stdout after `prefix` (one-shot questions print the bare answer, for scripts)."""
    start = time.perf_counter()
    pieces = session.ask_stream(question, images, videos)
    first = next(pieces, "")  # media and prompt errors surface here, before anything is printed
    print(f"{prefix}{first}", end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    if stats:
        s = session.last_stats
        total = time.perf_counter() - start
        print(f"[first token {s['first_token_s']:.2f}s, {s['new_tokens']} tokens in {total:.2f}s, {s['prompt_tokens']} new prompt tokens]", file=sys.stderr)
