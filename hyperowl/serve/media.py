"""Media of a request: where an image or video URL may point, and loading it within the limits.

Accepted URLs:
- `data:[<mime>][;base64],<data>` (bounded by the request body limit);
- a local file, as `file:///abs/path`, an absolute path or a path relative to `--media-dir`, only
  when the server has a media folder, and only if the path, with every symlink resolved, is a regular
  file inside that folder (so `..`, absolute paths elsewhere and symlinks pointing out are refused,
  with one message that does not reveal whether the file exists);
- `http(s)://...` only with `--allow-remote-media`, at most `max_media_bytes`, within
  `remote_timeout_s` in total.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import functools
import io
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

import av
import httpx
from PIL import Image

from hyperowl.errors import MediaError
from hyperowl.processing.image import load_image
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling, VideoPlan, plan_video
from hyperowl.serve.errors import ApiError, limit_error
from hyperowl.serve.settings import ServerSettings

#: What a media URL resolves to: the file's bytes, or a checked path inside the media folder.
MediaSource = bytes | Path


def media_error(message: str, code: str = "invalid_media") -> ApiError:
    """400 for a media part that cannot be used."""
    return ApiError(400, message, param="messages", code=code)


def decode_data_uri(url: str) -> bytes:
    """The payload of a `data:` URI (base64 or percent-encoded)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise media_error("malformed data URI: no ',' before the data")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise media_error(f"malformed data URI: invalid base64 ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise media_error("data URI is empty")
    return data


def local_path(url: str, settings: ServerSettings) -> Path:
    """The checked path of a local media URL (`file://...` or a plain path) inside `settings.media_dir`."""
    if settings.media_dir is None:
        raise media_error(
            "local media paths are disabled; send a data: URI (or start the server with --media-dir)", code="local_media_disabled"
        )
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise media_error(f"file URL with a remote host is not supported: {url}")
        url = unquote(parsed.path)
    root = settings.media_dir.resolve()
    refused = media_error(
        f"media path {url!r} is not a readable file inside the server's media folder", code="media_path_refused"
    )
    try:
        path = (root / url).resolve(strict=True)
        if not path.is_relative_to(root) or not path.is_file():
            raise refused
        size = path.stat().st_size
    except (OSError, RuntimeError, ValueError) as exc:
        raise refused from exc
    if size > settings.max_media_bytes:
        raise limit_error(
            f"media file {url!r} has {size} bytes, more than {settings.max_media_bytes}", "max_media_bytes", "messages"
        )
    return path


async def fetch_remote(url: str, settings: ServerSettings) -> bytes:
    """Download `url` (http/https) within the size cap and the total timeout."""
    if not settings.allow_remote_media:
        raise media_error(
            "remote media URLs are disabled; send a data: URI (or start the server with --allow-remote-media)",
            code="remote_media_disabled",
        )
    too_big = limit_error(f"remote media {url!r} is larger than {settings.max_media_bytes} bytes", "max_media_bytes", "messages")

    async def download() -> bytes:
        client = httpx.AsyncClient(timeout=settings.remote_timeout_s, follow_redirects=True, max_redirects=5)
        async with client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise media_error(f"fetching {url!r} failed: HTTP {response.status_code}", code="media_fetch_failed")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_media_bytes:
                raise too_big
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > settings.max_media_bytes:
                    raise too_big
            return bytes(data)

    try:
        return await asyncio.wait_for(download(), settings.remote_timeout_s)
    except asyncio.TimeoutError as exc:
        raise media_error(f"fetching {url!r} took longer than {settings.remote_timeout_s} s", code="media_fetch_timeout") from exc
    except httpx.HTTPError as exc:
        raise media_error(f"fetching {url!r} failed: {exc}", code="media_fetch_failed") from exc


async def resolve_media(url: str, settings: ServerSettings) -> MediaSource:
    """Bytes or a checked local path for one media URL."""
    scheme = urlparse(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url)
    if scheme in ("http", "https"):
        return await fetch_remote(url, settings)
    if scheme in ("", "file"):
        return local_path(url, settings)
    raise media_error(f"unsupported media URL scheme {scheme!r}; use data:, a file path or http(s)")


def _opened(source: MediaSource) -> io.BytesIO | str:
    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def image_size(source: MediaSource) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it; (0, 0) when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_opened(source)) as probe:
                return probe.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0, 0


def video_frame_size(source: MediaSource, index: int) -> tuple[int, int]:
    """(width, height) of video number `index`'s frames from its container, without decoding any."""
    try:
        with av.open(_opened(source), mode="r") as container:
            streams = container.streams.video
            return (streams[0].width, streams[0].height) if streams else (0, 0)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"cannot read video {index + 1}: {exc}") from exc


def _malloc_trim() -> Callable[[], object]:
    """glibc's `malloc_trim(0)` (hands freed heap memory back to the system), or a no-op elsewhere."""
    try:
        return functools.partial(ctypes.CDLL("libc.so.6").malloc_trim, 0)
    except (OSError, AttributeError):
        return lambda: None


#: Called when the last decoding request finishes: decoded media are freed by then, and glibc would
#: otherwise keep their pages (hundreds of MB after a few large images) for the life of the process.
release_free_memory = _malloc_trim()


class DecodeGate:
    """Bounds media decoding across requests: at most `slots` requests decode at once, and the pixels
    they decode together stay within `pixel_budget` (a request needing more than the whole budget waits
    until it can decode alone). Requests wait their turn in the event loop, holding no decoded media."""

    def __init__(self, slots: int, pixel_budget: int) -> None:
        self.slots = slots
        self.pixel_budget = pixel_budget
        self.decoding = 0
        self.pixels = 0
        self._changed = asyncio.Condition()

    def _fits(self, pixels: int) -> bool:
        return self.decoding == 0 or (self.decoding < self.slots and self.pixels + pixels <= self.pixel_budget)

    @asynccontextmanager
    async def admit(self, pixels: int) -> AsyncIterator[None]:
        """Hold a decoding slot and `pixels` of the budget for the `async with` block."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(pixels))
            self.decoding += 1
            self.pixels += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.decoding -= 1
                self.pixels -= pixels
                self._changed.notify_all()
            if self.decoding == 0 and pixels:
                release_free_memory()


def load_checked_image(source: MediaSource, index: int, settings: ServerSettings) -> Image.Image:
    """Decode image number `index` (0-based) of a request after checking its size from the header."""
    width, height = image_size(source)  # (0, 0) for an unreadable file: load_image reports what is wrong
    if width * height > settings.max_image_pixels:
        raise limit_error(
            f"image {index + 1} has {width} x {height} pixels, more than {settings.max_image_pixels}",
            "max_image_pixels",
            "messages",
        )
    return load_image(source, settings.max_image_pixels)


def plan_checked_video(
    source: MediaSource,
    index: int,
    fps: float,
    max_frames: int,
    settings: ServerSettings,
    sampling: Sampling = DEFAULT_SAMPLING,
) -> VideoPlan:
    """Check the frame size of video number `index` (0-based) and read its packet index: up to
    `max_frames` sampled frames (reached as `sampling` says), decoded later, while the model encodes
    them (`hyperowl.processing.stream`)."""
    width, height = video_frame_size(source, index)
    if width * height > settings.max_image_pixels:
        raise limit_error(
            f"video {index + 1} has {width} x {height} pixel frames, more than {settings.max_image_pixels}",
            "max_image_pixels",
            "messages",
        )
    return plan_video(source, fps=fps, max_frames=max_frames, sampling=sampling)
