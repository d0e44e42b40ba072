"""Chat about images, image sets and videos, one question or an interactive multi-turn session.

Examples:
  hyperowl chat --image cat.jpg "What is in the picture?"
  hyperowl chat --video movie.mp4 --max-frames 64 "What happens at the end?"
  hyperowl chat --video film.mkv --max-frames 400 --video-sampling keyframe "Who is in the film?"
  hyperowl chat --image a.png --image b.png          (interactive; /image P and /video P add media, /quit ends)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hyperowl.cli import add_model_arguments, load_model_and_processor
from hyperowl.engine.chat import ChatSession
from hyperowl.engine.sampling import SamplingParams
from hyperowl.errors import HyperowlError
from hyperowl.processing.video import DEFAULT_SAMPLING


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
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--vision-chunk-size", type=int, default=None, help="images encoded per vision-tower batch")
    parser.add_argument("--stats", action="store_true", help="print first-token latency and speed after each answer")


def run(args: argparse.Namespace) -> int:
    overrides = {"cut_enable": not args.no_cut}
    if args.max_frames is not None:
        overrides["max_frames"] = args.max_frames
    if args.fps is not None:
        overrides["video_fps"] = args.fps
    model, processor = load_model_and_processor(args, **overrides)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    session = ChatSession(
        model,
        processor,
        system=args.system,
        params=params,
        vision_chunk_size=args.vision_chunk_size,
        progress=True,
        video_sampling=args.video_sampling,
    )
    images, videos = [str(p) for p in args.image], [str(p) for p in args.video]
    if args.question:
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
