"""Helpers that make test media: block images, PNG headers and small videos written with PyAV."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
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
