"""Serve the model over an OpenAI-compatible HTTP API (chat completions with images and videos) and a chat web page.

Examples:
  hyperowl serve --model DIR --host 127.0.0.1 --port 8000
  hyperowl serve --model DIR --media-dir /data/media --api-key SECRET --max-batch-size 8
Then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hyperowl.cli import add_model_arguments, load_model_and_processor
from hyperowl.serve.settings import ServerSettings

_DEFAULTS = ServerSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model id of the API (default: the model folder's name)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HYPEROWL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: env HYPEROWL_API_KEY)",
    )
    parser.add_argument("--media-dir", type=Path, default=None, help="folder local media paths may be read from (default: none)")
    parser.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    parser.add_argument("--remote-timeout", type=float, default=_DEFAULTS.remote_timeout_s, help="seconds per remote fetch")
    parser.add_argument("--max-body-mb", type=float, default=_DEFAULTS.max_body_bytes / 2**20, help="largest request body")
    parser.add_argument(
        "--max-media-mb",
        type=float,
        default=_DEFAULTS.max_media_bytes / 2**20,
        help="largest media file read from --media-dir or fetched",
    )
    parser.add_argument("--max-images", type=int, default=_DEFAULTS.max_images, help="most images per request")
    parser.add_argument("--max-frames", type=int, default=_DEFAULTS.max_frames, help="most video frames per request")
    parser.add_argument(
        "--default-frames",
        type=int,
        default=_DEFAULTS.default_frames,
        help="frames sampled per video when the request does not say",
    )
    parser.add_argument("--max-image-pixels", type=int, default=_DEFAULTS.max_image_pixels, help="largest width*height")
    parser.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens, help="largest max_tokens a request may ask")
    parser.add_argument("--default-max-tokens", type=int, default=_DEFAULTS.default_max_tokens)
    parser.add_argument("--request-timeout", type=float, default=_DEFAULTS.request_timeout_s, help="seconds per request")
    parser.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue, help="most requests waiting (more get 503)")
    parser.add_argument(
        "--max-batch-size", type=int, default=_DEFAULTS.max_batch_size, help="most requests decoded together (1 = one at a time)"
    )
    parser.add_argument("--video-fps", type=float, default=None, help="frames per second sampled from videos")
    parser.add_argument("--no-cut", action="store_true", help="do not cut images into tiles (global view only)")
    parser.add_argument("--vision-chunk-size", type=int, default=None, help="images encoded per vision-tower batch")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """`ServerSettings` from the parsed command line."""
    name = args.served_model_name or (args.model.resolve().name if args.model else "hyperowl")
    return ServerSettings(
        model_name=name,
        api_key=args.api_key or None,
        media_dir=args.media_dir,
        allow_remote_media=args.allow_remote_media,
        remote_timeout_s=args.remote_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_media_bytes=int(args.max_media_mb * 2**20),
        max_images=args.max_images,
        max_frames=args.max_frames,
        default_frames=args.default_frames,
        max_image_pixels=args.max_image_pixels,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        request_timeout_s=args.request_timeout,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        vision_chunk_size=args.vision_chunk_size,
    )


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from hyperowl.serve.app import create_app

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"hyperowl serve: error: {exc}") from exc
    if settings.media_dir is not None and not settings.media_dir.is_dir():
        raise SystemExit(f"hyperowl serve: error: --media-dir {settings.media_dir} is not a folder")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    overrides: dict[str, Any] = {"cut_enable": not args.no_cut, "max_pixels": settings.max_image_pixels}
    if args.video_fps is not None:
        overrides["video_fps"] = args.video_fps
    model, processor = load_model_and_processor(args, **overrides)
    app = create_app(model, processor, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
