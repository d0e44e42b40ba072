"""Video frame sampling and streaming decoding with PyAV (mp4, mkv, webm, avi, ...).

Frames are chosen as in the official mPLUG-Owl3 demo: one frame every ``round(native_fps / fps)``
frames (1 frame per second by default), then uniformly down to at most ``max_frames``. The frame
indices are fixed from the stream metadata before decoding, and only those frames are converted and
kept while the file is decoded in one pass, so a long file never sits in memory.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
from PIL import Image
from tqdm.auto import tqdm

from hyperowl.errors import MediaError
from hyperowl.processing.image import ImageSource, load_image

VideoFileSource = str | Path | bytes

#: Frames kept from a video file when no cap is given (the official demo's 16). A video given as a
#: list of frames keeps all of them by default, as in the official processor.
FILE_MAX_FRAMES = 16


@dataclass
class VideoClip:
    """Sampled frames of a video and their presentation times in seconds (same length)."""

    frames: list[Image.Image]
    timestamps: list[float]

    def __len__(self) -> int:
        return len(self.frames)


def sample_frame_indices(
    num_frames: int, native_fps: float, fps: float = 1.0, max_frames: int | None = 16
) -> list[int]:
    """Indices of the frames to keep from a video of ``num_frames`` frames at ``native_fps``.

    Every ``max(1, round(native_fps / fps))``-th frame from frame 0 is taken; if that is more than
    ``max_frames`` (None: no cap), ``max_frames`` of them are kept uniformly: element
    ``int(i * gap + gap / 2)`` with ``gap = len / max_frames``.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if native_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got native_fps={native_fps}, fps={fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    step = max(1, round(native_fps / fps))
    indices = list(range(0, num_frames, step))
    if max_frames is not None and len(indices) > max_frames:
        gap = len(indices) / max_frames
        indices = [indices[int(i * gap + gap / 2)] for i in range(max_frames)]
    return indices


def _opener(src: VideoFileSource) -> tuple[str, Callable[[], av.container.InputContainer]]:
    """Return a display name and a function opening the source as a PyAV input container."""
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        return "<bytes>", lambda: av.open(io.BytesIO(data), mode="r")
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    return str(path), lambda: av.open(str(path), mode="r")


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError(f"no video stream in {name}")
    return container.streams.video[0]


def _probe(open_container: Callable[[], av.container.InputContainer], name: str, fps: float) -> tuple[int, float]:
    """Return ``(num_frames, native_fps)`` of the first video stream.

    The frame count comes from the stream header; containers without one (mkv, webm) have their
    packets counted in a demux-only pass (no decoding). An unknown frame rate falls back to ``fps``
    (every frame is then one sample).
    """
    with open_container() as container:
        stream = _video_stream(container, name)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        native_fps = float(rate) if rate else fps
        num_frames = stream.frames
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
    return num_frames, native_fps


def iter_video_chunks(
    src: VideoFileSource,
    chunk_size: int = 16,
    *,
    fps: float = 1.0,
    max_frames: int | None = 16,
    progress: bool | None = None,
) -> Iterator[VideoClip]:
    """Decode a video file in one streaming pass and yield its sampled frames in chunks.

    The file is opened and probed at call time (so a missing or unreadable file raises here);
    decoding happens while the returned iterator is consumed.

    Args:
        src: path or encoded file bytes of a video PyAV can read.
        chunk_size: frames per yielded clip (the last may be shorter).
        fps: frames per second to sample before the ``max_frames`` cap.
        max_frames: cap on the number of sampled frames (None: no cap, for long-video work).
        progress: show a tqdm bar; None shows it only on a terminal and after 1 s.

    Returns:
        An iterator of :class:`VideoClip` chunks with at most ``chunk_size`` RGB frames each, in
        time order.

    Raises:
        MediaError: missing or unreadable file, no video stream, or no frames (the last possibly
            while iterating, when the header promised frames that do not decode).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    name, open_container = _opener(src)
    try:
        num_frames, native_fps = _probe(open_container, name, fps)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read video {name}: {exc}") from exc
    if num_frames == 0:
        raise MediaError(f"video has no frames: {name}")
    targets = sample_frame_indices(num_frames, native_fps, fps, max_frames)
    return _decode_chunks(open_container, name, targets, native_fps, chunk_size, progress)


def count_sampled_frames(src: VideoFileSource, *, fps: float = 1.0, max_frames: int | None = 16) -> int:
    """How many frames :func:`iter_video_chunks` keeps from ``src`` with these settings (reads the
    header, no decoding), e.g. to size a prompt and preallocate before decoding starts.

    Raises:
        MediaError: missing or unreadable file, or no video stream.
    """
    name, open_container = _opener(src)
    try:
        num_frames, native_fps = _probe(open_container, name, fps)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read video {name}: {exc}") from exc
    return len(sample_frame_indices(num_frames, native_fps, fps, max_frames))


def _decode_chunks(
    open_container: Callable[[], av.container.InputContainer],
    name: str,
    targets: list[int],
    native_fps: float,
    chunk_size: int,
    progress: bool | None,
) -> Iterator[VideoClip]:
    """Decode frames in order up to the last target, converting and keeping only those in ``targets`` (sorted)."""
    kept = 0
    try:
        with open_container() as container, tqdm(
            total=targets[-1] + 1,
            desc=f"decoding {Path(name).name}",
            unit="frame",
            disable=None if progress is None else not progress,
            delay=1.0 if progress is None else 0.0,
        ) as bar:
            stream = _video_stream(container, name)
            stream.thread_type = "AUTO"
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            chunk = VideoClip([], [])
            for index, frame in enumerate(container.decode(stream)):
                bar.update(1)
                if index != targets[kept]:
                    continue
                chunk.frames.append(frame.to_image())
                chunk.timestamps.append(frame.time - start if frame.time is not None else index / native_fps)
                kept += 1
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = VideoClip([], [])
                if kept == len(targets):
                    break
            if chunk.frames:
                yield chunk
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read video {name}: {exc}") from exc
    if kept == 0:
        raise MediaError(f"video has no decodable frames: {name}")


def load_video(
    src: VideoFileSource | Sequence[ImageSource],
    *,
    fps: float = 1.0,
    max_frames: int | None | Literal["default"] = "default",
    frame_rate: float | None = None,
    progress: bool | None = None,
) -> VideoClip:
    """Load the sampled frames of a video.

    Args:
        src: a video file (path or bytes), or a list of frames (PIL images, arrays, image paths).
        fps: frames per second to sample.
        max_frames: cap on the number of frames (None: no cap); ``"default"`` caps a file at
            :data:`FILE_MAX_FRAMES` and keeps every sampled frame of a frame list.
        frame_rate: for a frame list, the rate it was recorded at; None means the list is already
            sampled at ``fps`` (only the ``max_frames`` cap applies). Ignored for files.
        progress: decoding progress bar, see :func:`iter_video_chunks`.

    Returns:
        A :class:`VideoClip`; frame list timestamps are ``index / frame_rate``.
    """
    if isinstance(src, (str, Path, bytes, bytearray)):
        if max_frames == "default":
            max_frames = FILE_MAX_FRAMES
        clip = VideoClip([], [])
        for chunk in iter_video_chunks(src, chunk_size=64, fps=fps, max_frames=max_frames, progress=progress):
            clip.frames.extend(chunk.frames)
            clip.timestamps.extend(chunk.timestamps)
        return clip
    if len(src) == 0:
        raise MediaError("video frame list is empty")
    native_fps = fps if frame_rate is None else frame_rate
    indices = sample_frame_indices(len(src), native_fps, fps, None if max_frames == "default" else max_frames)
    return VideoClip([load_image(src[i]) for i in indices], [i / native_fps for i in indices])
