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
    limit = lambda flag, kind, default, text: parser.add_argument(
        flag, type=kind, default=default, help=f"{text} (default: %(default)s)"
    )
    limit("--remote-timeout", float, _DEFAULTS.remote_timeout_s, "seconds per remote fetch")
    limit("--max-body-mb", float, _DEFAULTS.max_body_bytes / 2**20, "largest request body, MiB")
    limit("--max-media-mb", float, _DEFAULTS.max_media_bytes / 2**20, "largest media file read from --media-dir or fetched, MiB")
    limit("--max-images", int, _DEFAULTS.max_images, "most images per request")
    limit("--max-frames", int, _DEFAULTS.max_frames, "most video frames per request")
    limit("--default-frames", int, _DEFAULTS.default_frames, "frames sampled per video when the request does not say")
    limit("--max-image-pixels", int, _DEFAULTS.max_image_pixels, "largest width*height of an image or video frame")
    limit("--max-tokens", int, _DEFAULTS.max_tokens, "largest max_tokens a request may ask")
    limit("--default-max-tokens", int, _DEFAULTS.default_max_tokens, "max_tokens of a request that does not say")
    limit("--max-text-chars", int, _DEFAULTS.max_text_chars, "most characters of message text per request (checked before tokenizing)")
    limit("--max-stop-strings", int, _DEFAULTS.max_stop_strings, "most stop strings per request")
    limit("--max-stop-chars", int, _DEFAULTS.max_stop_chars, "longest stop string, characters")
    limit("--request-timeout", float, _DEFAULTS.request_timeout_s, "seconds per request, queued + generating")
    limit("--max-queue", int, _DEFAULTS.max_queue, "most requests waiting (more get 503)")
    limit("--max-batch-size", int, _DEFAULTS.max_batch_size, "most requests decoded together (1 = one at a time)")
    limit("--max-concurrent-decodes", int, _DEFAULTS.max_concurrent_decodes, "most requests decoding media at once")
    limit("--max-pixels-in-flight", int, _DEFAULTS.max_pixels_in_flight, "most decoded image pixels of the requests decoding media at once")
    limit("--header-timeout", float, _DEFAULTS.header_timeout_s, "seconds a connection has to send complete request headers")
    limit("--body-timeout", float, _DEFAULTS.body_timeout_s, "seconds a request body has to arrive completely")
    limit("--keep-alive-timeout", float, _DEFAULTS.keep_alive_timeout_s, "seconds an idle keep-alive connection stays open")
    limit("--max-connections", int, _DEFAULTS.max_connections, "most open connections (more get 503 and are closed)")
    limit(
        "--media-cache-mb", float, _DEFAULTS.media_cache_bytes / 2**20,
        "vision features of images and videos kept across requests, MiB (0 = none): a repeated medium is not decoded again",
    )
    parser.add_argument("--video-fps", type=float, default=None, help="frames per second sampled from videos")
    parser.add_argument("--no-cut", action="store_true", help="do not cut images into tiles (global view only)")
    parser.add_argument("--vision-chunk-size", type=int, default=None, help="images encoded per vision-tower batch")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--rag-index", action="append", default=[], metavar="NAME=DIR",
        help="a `hyperowl rag index` directory requests may name in their retrieval field (repeatable); docs/rag.md",
    )
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
        max_text_chars=args.max_text_chars,
        max_stop_strings=args.max_stop_strings,
        max_stop_chars=args.max_stop_chars,
        max_concurrent_decodes=args.max_concurrent_decodes,
        max_pixels_in_flight=args.max_pixels_in_flight,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout,
        max_connections=args.max_connections,
        media_cache_bytes=int(args.media_cache_mb * 2**20),
    )


def open_rag_indexes(specs: list[str], model, processor, model_arg) -> dict:
    """`--rag-index NAME=DIR` values -> opened indexes (checked against this model's vision tower)."""
    if not specs:
        return {}
    from hyperowl.cli import DEFAULT_MODEL
    from hyperowl.rag import PictureEmbedder, RagIndex, RagIndexError

    embedder = PictureEmbedder(model, processor.image_size)
    indexes = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory or name in indexes:
            raise RagIndexError(f"--rag-index takes NAME=DIR with a new NAME each time; got {spec!r}")
        indexes[name] = RagIndex(directory, embedder, str(model_arg or DEFAULT_MODEL))
    return indexes


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from hyperowl.serve.app import create_app
    from hyperowl.serve.transport import guarded_protocol

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
    app = create_app(model, processor, settings, open_rag_indexes(args.rag_index, model, processor, args.model))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )
    return 0
