"""Video frame sampling and streaming decoding with PyAV (mp4, mkv, webm, avi, ...).

Frames are chosen as in the official mPLUG-Owl3 demo: one frame every ``round(native_fps / fps)``
frames (1 frame per second by default), then uniformly down to at most ``max_frames``. The frame
indices are fixed from the packet index before decoding (:func:`plan_video`), and only those frames
are converted and kept, chunk by chunk, so a long file never sits in memory.

Frames are reached by seeking (see :data:`Sampling`): the packet index (timestamps and keyframe flags
of every packet, demuxed once without decoding) says where each keyframe interval starts, so a
2-hour film is decoded only around the sampled frames instead of from end to end.
"""

from __future__ import annotations

import bisect
import collections
import io
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
from PIL import Image
from tqdm.auto import tqdm

from hyperowl.errors import MediaError
from hyperowl.processing.image import DEFAULT_MAX_PIXELS, ImageSource, load_image

VideoFileSource = str | Path | bytes

#: Frames kept from a video file when no cap is given (the official demo's 16). A video given as a
#: list of frames keeps all of them by default, as in the official processor.
FILE_MAX_FRAMES = 16

#: How sampled frames are reached in a video file. ``exact``: seek to the keyframe before each
#: sampled frame and decode forward to it (the frames a one-pass decode picks, pixel for pixel).
#: ``keyframe``: take the keyframe nearest to each sampled frame (decodes one frame per sample;
#: timestamps are the keyframes' own, so they can be up to half a keyframe interval off the grid).
#: ``scan``: decode the whole file once from the start (the reference ``exact`` is tested against).
#: Files whose packets lack usable timestamps (e.g. some avi) are always scanned, whatever the mode.
Sampling = Literal["exact", "keyframe", "scan"]
SAMPLING_MODES: tuple[str, ...] = ("exact", "keyframe", "scan")
#: Exact frames by default: the official frame choice, several times faster than a scan on long files.
DEFAULT_SAMPLING: Sampling = "exact"


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


@dataclass(frozen=True)
class FrameIndex:
    """Where the frames of a video stream are, read once by demuxing its packets (no decoding).

    Attributes:
        pts: presentation timestamp (in ``time_base`` units) of every frame, sorted; frame ``i`` of a
            one-pass decode is the frame with ``pts[i]``.
        keyframe_pts: presentation timestamps of the keyframes (decoding can start there), sorted.
    """

    pts: list[int]
    keyframe_pts: list[int]

    def keyframe_before(self, pts: int) -> int:
        """Position in ``keyframe_pts`` of the last keyframe at or before ``pts`` (-1: none)."""
        return bisect.bisect_right(self.keyframe_pts, pts) - 1

    def nearest_keyframe(self, pts: int) -> int:
        """The keyframe timestamp closest to ``pts`` (the earlier one on a tie)."""
        after = bisect.bisect_left(self.keyframe_pts, pts)
        candidates = self.keyframe_pts[max(after - 1, 0) : after + 1]
        return min(candidates, key=lambda k: (abs(k - pts), k))


def _read_index(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> FrameIndex | None:
    """Demux every packet of ``stream`` once; None when some packet has no timestamp, two packets share
    one, or there is no keyframe (such files are only read in one decoding pass)."""
    pts: list[int] = []
    keyframes: list[int] = []
    for packet in container.demux(stream):
        timestamp = packet.pts
        if timestamp is None:
            if packet.size:
                return None
            continue  # the empty packet that ends the stream
        pts.append(timestamp)
        if packet.is_keyframe:
            keyframes.append(timestamp)
    if (pts and not keyframes) or len(set(pts)) != len(pts):
        return None
    return FrameIndex(sorted(pts), sorted(keyframes))


@dataclass
class _Probe:
    """What the header and the packet index say about the first video stream."""

    num_frames: int
    native_fps: float
    index: FrameIndex | None


def _probe(
    open_container: Callable[[], av.container.InputContainer], name: str, fps: float, max_pixels: int
) -> _Probe:
    """Frame count, frame rate and packet index of the first video stream.

    The frame size is checked against ``max_pixels`` from the header, before any packet is read.
    The frame count is the number of packets with a timestamp (the header's count is not trusted:
    mkv/webm have none, and a truncated or rewritten file may claim more than it holds); files
    without packet timestamps fall back to the header's count. An unknown frame rate falls back to
    ``fps`` (every frame is then one sample).
    """
    with open_container() as container:
        stream = _video_stream(container, name)
        if stream.width * stream.height > max_pixels:
            raise MediaError(
                f"video frames too large: {name} has {stream.width} x {stream.height} pixel frames "
                f"> limit of {max_pixels} pixels"
            )
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        native_fps = float(rate) if rate else fps
        header_frames = stream.frames
        index = _read_index(container, stream)
    if index is not None:
        return _Probe(len(index.pts), native_fps, index)
    if header_frames <= 0:
        with open_container() as container:
            stream = container.streams.video[0]
            header_frames = sum(1 for packet in container.demux(stream) if packet.size)
    return _Probe(header_frames, native_fps, None)


@dataclass
class VideoPlan:
    """A video file opened and indexed, with its sample frames chosen; decoding happens in
    :meth:`chunks`. ``len(plan)`` is the number of frames it yields (known before decoding)."""

    name: str
    open_container: Callable[[], av.container.InputContainer]
    probe: _Probe
    targets: list[int]
    sampling: Sampling

    def __len__(self) -> int:
        return len(self.targets)

    def chunks(self, chunk_size: int = 16, progress: bool | None = None, frame_size: int | None = None) -> Iterator[VideoClip]:
        """Decode the sampled frames and yield them in :class:`VideoClip` chunks of at most
        ``chunk_size`` RGB frames, in time order. With ``frame_size`` each frame is resized (bicubic) to
        ``frame_size x frame_size`` as soon as it is decoded, as :func:`image_to_tensor` would resize it
        later (the same pixels), so a clip holds model-sized frames instead of full-resolution ones.

        Raises:
            MediaError: the file stops decoding (e.g. truncated) before any sampled frame.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return _decode_chunks(self, chunk_size, progress, frame_size)

    def load(self, progress: bool | None = None, frame_size: int | None = None) -> VideoClip:
        """Decode every sampled frame into one :class:`VideoClip` (arguments as in :meth:`chunks`).

        Raises:
            MediaError: as :meth:`chunks`.
        """
        clip = VideoClip([], [])
        for chunk in self.chunks(64, progress, frame_size):
            clip.frames.extend(chunk.frames)
            clip.timestamps.extend(chunk.timestamps)
        return clip


def plan_video(
    src: VideoFileSource,
    *,
    fps: float = 1.0,
    max_frames: int | None = 16,
    sampling: Sampling = DEFAULT_SAMPLING,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoPlan:
    """Open ``src``, check its frame size, read its packet index and choose the frames to sample.

    Args:
        src: path or encoded file bytes of a video PyAV can read.
        fps: frames per second to sample before the ``max_frames`` cap.
        max_frames: cap on the number of sampled frames (None: no cap, for long-video work).
        sampling: how frames are reached, see :data:`Sampling`.
        max_pixels: largest accepted ``width * height`` of a frame, checked from the header.

    Raises:
        MediaError: missing or unreadable file, no video stream, frames over ``max_pixels``, no frames.
    """
    if sampling not in SAMPLING_MODES:
        raise MediaError(f"unknown video sampling {sampling!r}; use one of {', '.join(SAMPLING_MODES)}")
    name, open_container = _opener(src)
    try:
        probe = _probe(open_container, name, fps, max_pixels)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read video {name}: {exc}") from exc
    if probe.num_frames == 0:
        raise MediaError(f"video has no frames: {name}")
    targets = sample_frame_indices(probe.num_frames, probe.native_fps, fps, max_frames)
    return VideoPlan(name, open_container, probe, targets, sampling)


def iter_video_chunks(
    src: VideoFileSource,
    chunk_size: int = 16,
    *,
    fps: float = 1.0,
    max_frames: int | None = 16,
    progress: bool | None = None,
    sampling: Sampling = DEFAULT_SAMPLING,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    frame_size: int | None = None,
) -> Iterator[VideoClip]:
    """Decode the sampled frames of a video file and yield them in chunks, never all in memory.

    The file is opened and indexed at call time (so a missing or unreadable file raises here);
    decoding happens while the returned iterator is consumed. Arguments as in :func:`plan_video`;
    ``chunk_size`` frames per yielded clip (the last may be shorter); ``progress`` shows a tqdm bar
    (None: only on a terminal and after 1 s); ``frame_size`` as in :meth:`VideoPlan.chunks`.

    Raises:
        MediaError: as :func:`plan_video`, or while iterating when no sampled frame decodes.
    """
    plan = plan_video(src, fps=fps, max_frames=max_frames, sampling=sampling, max_pixels=max_pixels)
    return plan.chunks(chunk_size, progress, frame_size)


def count_sampled_frames(
    src: VideoFileSource, *, fps: float = 1.0, max_frames: int | None = 16, max_pixels: int = DEFAULT_MAX_PIXELS
) -> int:
    """How many frames :func:`iter_video_chunks` keeps from ``src`` with these settings (reads the
    packet index, no decoding); use :func:`plan_video` to also decode without indexing twice.

    Raises:
        MediaError: as :func:`plan_video`.
    """
    return len(plan_video(src, fps=fps, max_frames=max_frames, max_pixels=max_pixels))


def _scan_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, targets: list[int]
) -> Iterator[tuple[int, av.VideoFrame]]:
    """One decoding pass from the start: ``(position in targets, frame)`` for the frame numbers in
    ``targets`` (sorted)."""
    kept = 0
    for number, frame in enumerate(container.decode(stream)):
        if number == targets[kept]:
            yield kept, frame
            kept += 1
            if kept == len(targets):
                return


def _decode_from(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, index: FrameIndex, interval: int, pts: int
) -> Iterator[av.VideoFrame]:
    """Frames (with timestamps) decoded after seeking to keyframe number ``interval`` of the index
    (-1: the first frame). A seek that lands after ``pts`` or at the end of the stream (a demuxer
    that seeks by decoding timestamps, a file without an index) is retried from the keyframe before."""
    while True:
        seek_to = index.keyframe_pts[interval] if interval >= 0 else index.pts[0]
        container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        frames = (frame for frame in container.decode(stream) if frame.pts is not None)
        first = next(frames, None)
        if first is not None and first.pts <= pts:
            return itertools.chain([first], frames)
        if interval < 0:
            return iter(())
        interval -= 1


def _seek_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    index: FrameIndex,
    wanted: list[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(position in wanted, frame)`` for each presentation timestamp in ``wanted`` (sorted): seek to
    the keyframe at or before it and decode forward to it. A target in a keyframe interval the decoder
    is already in (or past the start of) is reached by decoding on, without seeking. A target the
    decoder never outputs (a corrupt or cut-off packet) is skipped, as a one-pass decode would."""
    frames: Iterator[av.VideoFrame] | None = None
    current = -2  # keyframe interval ``frames`` started in
    pending: av.VideoFrame | None = None  # decoded past a missing target; may be the next one
    for position, pts in enumerate(wanted):
        interval = index.keyframe_before(pts)
        behind = pending is None or (interval >= 0 and pending.pts < index.keyframe_pts[interval])
        if frames is None or (behind and interval != current):
            frames, current, pending = _decode_from(container, stream, index, interval, pts), interval, None
        frame = pending if pending is not None and pending.pts >= pts else None
        if frame is None:
            frame = next((f for f in frames if f.pts >= pts), None)
        pending = frame
        if frame is None:
            frames = None
        elif frame.pts == pts:
            yield position, frame


def _keyframe_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    index: FrameIndex,
    wanted: list[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(position in wanted, frame)`` with the keyframe nearest to each presentation timestamp in
    ``wanted`` (sorted). Targets sharing a nearest keyframe get the same frame."""
    stream.codec_context.skip_frame = "NONKEY"
    taken: av.VideoFrame | None = None
    for position, pts in enumerate(wanted):
        keyframe = index.nearest_keyframe(pts)
        if taken is None or taken.pts != keyframe:
            taken = _decode_keyframe(container, stream, index, keyframe)
        if taken is not None and taken.pts == keyframe:
            yield position, taken


def _decode_keyframe(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, index: FrameIndex, keyframe: int
) -> av.VideoFrame | None:
    """The frame of the keyframe with presentation timestamp ``keyframe``: seek there, decode its packet
    alone and drain the decoder (no reordering delay, nothing after it decoded). When the seek does
    not reach that packet, decode forward from the keyframe before (non-key frames skipped)."""
    codec = stream.codec_context
    container.seek(keyframe, stream=stream, backward=True, any_frame=False)
    for packet in container.demux(stream):
        if packet.pts is None or not packet.size:
            continue
        if packet.pts == keyframe and packet.is_keyframe:
            frames = [*codec.decode(packet), *codec.decode(None)]
            codec.flush_buffers()
            frame = next((frame for frame in frames if frame.pts == keyframe), None)
            if frame is not None:
                frame.time_base = stream.time_base
            return frame
        if packet.is_keyframe and packet.pts > keyframe:
            break
    frames = _decode_from(container, stream, index, bisect.bisect_left(index.keyframe_pts, keyframe), keyframe)
    return next((frame for frame in frames if frame.pts >= keyframe), None)


def _decode_chunks(plan: VideoPlan, chunk_size: int, progress: bool | None, frame_size: int | None) -> Iterator[VideoClip]:
    """Decode ``plan``'s frames the way its ``sampling`` says and yield them converted, in chunks."""
    kept = 0
    probe = plan.probe
    try:
        with tqdm(
            total=len(plan.targets),
            desc=f"decoding {Path(plan.name).name}",
            unit="frame",
            disable=None if progress is None else not progress,
            delay=1.0 if progress is None else 0.0,
        ) as bar:
            if probe.index is None or plan.sampling == "scan":
                frames = _scanned(plan, frame_size)
            else:
                frames = _seeked(plan, probe.index, frame_size)
            chunk = VideoClip([], [])
            for image, time in frames:
                bar.update(1)
                chunk.frames.append(image)
                chunk.timestamps.append(time)
                kept += 1
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = VideoClip([], [])
            if chunk.frames:
                yield chunk
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read video {plan.name}: {exc}") from exc
    if kept == 0:
        raise MediaError(f"video has no decodable frames: {plan.name}")


def _converted(
    plan: VideoPlan, stream: av.video.stream.VideoStream, frames: Iterator[tuple[int, av.VideoFrame]], frame_size: int | None
) -> Iterator[tuple[Image.Image, float]]:
    """``(RGB image, seconds from the stream start)`` for each ``(position in targets, frame)``; with
    ``frame_size`` resized (bicubic) to ``frame_size x frame_size``."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    for position, frame in frames:
        # Pixel-equal to frame.to_image(), in half the time (one copy fewer).
        image = Image.fromarray(frame.to_ndarray(format="rgb24"))
        if frame_size is not None and image.size != (frame_size, frame_size):
            image = image.resize((frame_size, frame_size), Image.Resampling.BICUBIC)
        time = frame.time - start if frame.time is not None else plan.targets[position] / plan.probe.native_fps
        yield image, time


def _scanned(plan: VideoPlan, frame_size: int | None) -> Iterator[tuple[Image.Image, float]]:
    """The sampled frames from one decoding pass over the file."""
    with plan.open_container() as container:
        stream = _video_stream(container, plan.name)
        stream.thread_type = "AUTO"
        yield from _converted(plan, stream, _scan_frames(container, stream, plan.targets), frame_size)


#: Threads that seek, decode and convert sampled frames in parallel, each with its own open file.
DECODE_WORKERS = min(8, os.cpu_count() or 1)


def _seek_groups(wanted: list[int], key: Callable[[int], int]) -> list[list[int]]:
    """Positions in ``wanted`` (sorted presentation timestamps) in runs that one seek serves: consecutive
    targets with the same ``key`` (the keyframe interval in ``exact`` mode, the nearest keyframe in
    ``keyframe`` mode). Runs are decoded independently."""
    groups: list[list[int]] = []
    last = None
    for position, pts in enumerate(wanted):
        k = key(pts)
        if not groups or k != last:
            groups.append([])
        groups[-1].append(position)
        last = k
    return groups


def _seeked(plan: VideoPlan, index: FrameIndex, frame_size: int | None) -> Iterator[tuple[Image.Image, float]]:
    """The sampled frames reached by seeking, in order. Runs of targets (:func:`_seek_groups`) are
    decoded and converted by up to :data:`DECODE_WORKERS` threads (PyAV and PIL release the GIL while
    they work), each holding its own container; at most two frames per thread (or one run, if longer) are
    decoded ahead of the consumer, so memory stays bounded whatever the frame size."""
    wanted = [index.pts[t] for t in plan.targets]
    exact = plan.sampling == "exact"
    groups = _seek_groups(wanted, index.keyframe_before if exact else index.nearest_keyframe)
    workers = max(1, min(DECODE_WORKERS, len(groups)))
    local = threading.local()
    opened: list[av.container.InputContainer] = []
    lock = threading.Lock()
    pick = _seek_frames if exact else _keyframe_frames

    def decode(group: list[int]) -> list[tuple[Image.Image, float]]:
        if not hasattr(local, "container"):
            local.container = plan.open_container()
            with lock:
                opened.append(local.container)
            local.stream = _video_stream(local.container, plan.name)
            # One thread per decoder: the parallelism is across seeks, and frame threads would
            # delay each seek's first frame.
            local.stream.thread_type = "SLICE"
        frames = pick(local.container, local.stream, index, [wanted[p] for p in group])
        return list(_converted(plan, local.stream, ((group[i], frame) for i, frame in frames), frame_size))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hyperowl-decode")
    try:
        pending: collections.deque[tuple[int, Future[list[tuple[Image.Image, float]]]]] = collections.deque()
        in_flight = 0  # frames decoded or being decoded and not yet handed on
        for group in groups:
            while pending and in_flight + len(group) > 2 * workers:
                size, future = pending.popleft()
                in_flight -= size
                yield from future.result()
            pending.append((len(group), pool.submit(decode, group)))
            in_flight += len(group)
        for _, future in pending:
            yield from future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for container in opened:
            container.close()


def load_video(
    src: VideoFileSource | Sequence[ImageSource],
    *,
    fps: float = 1.0,
    max_frames: int | None | Literal["default"] = "default",
    frame_rate: float | None = None,
    progress: bool | None = None,
    sampling: Sampling = DEFAULT_SAMPLING,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    frame_size: int | None = None,
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
        sampling: how frames of a file are reached, see :data:`Sampling`.
        max_pixels: largest accepted frame ``width * height`` of a file, checked from its header.
        frame_size: resize the frames of a file to ``frame_size x frame_size`` as they are decoded (what
            the processor feeds the vision tower), so the clip never holds full-resolution frames.

    Returns:
        A :class:`VideoClip`; frame list timestamps are ``index / frame_rate``.
    """
    if isinstance(src, (str, Path, bytes, bytearray)):
        if max_frames == "default":
            max_frames = FILE_MAX_FRAMES
        plan = plan_video(src, fps=fps, max_frames=max_frames, sampling=sampling, max_pixels=max_pixels)
        return plan.load(progress, frame_size)
    if len(src) == 0:
        raise MediaError("video frame list is empty")
    native_fps = fps if frame_rate is None else frame_rate
    indices = sample_frame_indices(len(src), native_fps, fps, None if max_frames == "default" else max_frames)
    return VideoClip([load_image(src[i]) for i in indices], [i / native_fps for i in indices])
