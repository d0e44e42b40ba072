"""Helpers that make test media: block images, PNG headers and small videos written with PyAV."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

#: One solid colour per second of a test video (far apart, so they survive yuv420p compression).
SECOND_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 255),
    (0, 0, 0),
    (128, 128, 128),
    (255, 128, 0),
)


def block_image(rows: int, cols: int, block: int, colors: Sequence[tuple[int, int, int]]) -> Image.Image:
    """RGB image of ``rows x cols`` solid ``block``-pixel squares, block ``(i, j)`` coloured ``colors[i*cols+j]``."""
    array = np.zeros((rows * block, cols * block, 3), dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            array[i * block : (i + 1) * block, j * block : (j + 1) * block] = colors[i * cols + j]
    return Image.fromarray(array)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` RGB pixels (its image data is one empty row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0"))
        + _png_chunk(b"IEND", b"")
    )


def write_video(
    path: Path, seconds: int, fps: int, codec: str, size: tuple[int, int] = (64, 48), frames: int | None = None
) -> Path:
    """Write ``seconds * fps`` frames (or ``frames``) of ``size`` (w, h); second ``k`` is ``SECOND_COLORS[k]``.

    ``frames=0`` writes only the container header.
    """
    count = seconds * fps if frames is None else frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for i in range(count):
            array = np.full((size[1], size[0], 3), SECOND_COLORS[i // fps], dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def nearest_second(image: Image.Image) -> int:
    """Index of the ``SECOND_COLORS`` entry closest to the image's mean colour."""
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in SECOND_COLORS]))


def pattern_frame(number: int, size: tuple[int, int]) -> np.ndarray:
    """RGB ``(h, w, 3)`` frame ``number`` of a pattern video: diagonal stripes shifted by the frame number
    and a bright bar whose position encodes it (every frame differs from its neighbours)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    array = np.stack([(x * 4 + number * 9) % 256, (y * 4 + number * 5) % 256, ((x + y) * 2) % 256], -1)
    array[:, (number * 4) % w : (number * 4) % w + 4] = 255
    return array.astype(np.uint8)


def write_pattern_video(
    path: Path,
    frames: int,
    codec: str = "libx264",
    *,
    fps: int = 8,
    size: tuple[int, int] = (64, 48),
    keyframe_interval: int = 8,
    b_frames: int = 0,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
) -> Path:
    """Write ``frames`` :func:`pattern_frame` frames with a keyframe every ``keyframe_interval`` frames
    and up to ``b_frames`` B-frames between references. ``pts`` (in ``time_base`` units, default
    ``1/fps``) gives each frame its own presentation time (a variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.codec_context.max_b_frames = b_frames
        if codec == "libx264":
            stream.options = {"x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:bframes={b_frames}"}
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        for number in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(number, size), format="rgb24")
            frame.pts = number if pts is None else pts[number]
            if time_base is not None:
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_undecodable_video(path: Path) -> Path:
    """An mp4 whose packet index reads (frame count, timestamps, keyframes) but whose packets hold no
    decodable data: every byte of its ``mdat`` payload is overwritten."""
    data = bytearray(write_video(path, seconds=3, fps=4, codec="libx264").read_bytes())
    at = data.find(b"mdat")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 : at - 4 + size] = b"\xff" * (size - 8)
    path.write_bytes(bytes(data))
    return path
