"""Server settings: where media may come from and every limit a request is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """Configuration of one server. Limit names double as the `code` of the error that reports them.

    Attributes:
        model_name: the id served at `/v1/models`; requests naming another model get 404.
        api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer <api_key>`.
        media_dir: local files (plain paths or file:// URLs) are read only from inside this folder;
            None refuses every local path.
        allow_remote_media: fetch http(s) media URLs (at most `max_media_bytes`, `remote_timeout_s`).
        max_body_bytes: largest request body.
        max_media_bytes: largest single image/video fetched from a URL or read from `media_dir`
            (a base64 data URI is bounded by `max_body_bytes`).
        max_images: most image parts per request.
        max_frames: most video frames per request (all videos together); also caps `max_frames` of a
            video part.
        default_frames: frames sampled per video when the part does not say.
        max_image_pixels: largest width * height of one image or video frame.
        max_tokens: largest `max_tokens` a request may ask for.
        default_max_tokens: `max_tokens` of a request that does not say.
        request_timeout_s: a request still queued or generating after this long is stopped.
        max_queue: most requests waiting for a batch slot; more get 503.
        max_batch_size: most requests decoded together (1 = one at a time).
        vision_chunk_size: images encoded per vision-tower batch (None: all at once).
        max_text_chars: most characters of message text per request, counted before tokenizing.
        max_stop_strings: most `stop` strings per request.
        max_stop_chars: longest `stop` string (characters).
        max_concurrent_decodes: most requests decoding media and processing their prompt at once.
        max_pixels_in_flight: most decoded image pixels of the requests decoding at once; a request
            needing more than this decodes alone. Video frames do not count: they are decoded by the
            scheduler a few chunks at a time while the model encodes them.
        header_timeout_s: a connection must send a request's complete headers within this long (from
            its first byte, or from connecting), else it is closed.
        body_timeout_s: a request body must arrive completely within this long (408 otherwise).
        keep_alive_timeout_s: an idle keep-alive connection is closed after this long.
        max_connections: most open connections; more are answered 503 and closed at once.
        media_cache_bytes: vision features of images and videos kept across requests, in bytes (0: none);
            a request whose media are kept skips decoding them and the vision tower
            (`hyperowl.serve.media_cache`).
    """

    model_name: str = "hyperowl"
    api_key: str | None = None
    media_dir: Path | None = None
    allow_remote_media: bool = False
    remote_timeout_s: float = 10.0
    max_body_bytes: int = 64 * 2**20
    max_media_bytes: int = 64 * 2**20
    max_images: int = 16
    max_frames: int = 64
    default_frames: int = 16
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 2048
    default_max_tokens: int = 512
    request_timeout_s: float = 300.0
    max_queue: int = 64
    max_batch_size: int = 16
    vision_chunk_size: int | None = None
    max_text_chars: int = 256 * 1024
    max_stop_strings: int = 4
    max_stop_chars: int = 256
    max_concurrent_decodes: int = 2
    max_pixels_in_flight: int = 4 * 4096 * 4096
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 512
    media_cache_bytes: int = 1024 * 2**20

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_media_bytes",
            "max_images",
            "max_frames",
            "default_frames",
            "max_image_pixels",
            "max_tokens",
            "default_max_tokens",
            "max_batch_size",
            "max_text_chars",
            "max_stop_strings",
            "max_stop_chars",
            "max_concurrent_decodes",
            "max_pixels_in_flight",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "media_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        timeouts = ("request_timeout_s", "remote_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s")
        for name in timeouts:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
