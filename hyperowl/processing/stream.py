"""Pixels of a prompt's images and videos made while the model consumes them.

A video file is planned first (its packet index says how many frames it gives, so the prompt can be
built), then decoded chunk by chunk in a background thread while the model encodes the chunks
before: at most `depth + 1` chunks of pixels exist at once, whatever the length of the video.
Images and decoded clips are already in memory; they are converted a chunk at a time the same way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from PIL import Image

from hyperowl.errors import MediaError
from hyperowl.model.owl3 import DEFAULT_CHUNK_SIZE, PixelStream
from hyperowl.processing.image import image_to_tensor
from hyperowl.processing.video import VideoPlan

T = TypeVar("T")

#: Chunks of pixels made ahead of the model by default (the one being made included).
STREAM_DEPTH = 2


def _produce(items: Iterable[T], ready: queue.Queue, free: threading.Semaphore, stop: threading.Event) -> None:
    """`Prefetch`'s thread: put `(True, item)` for each item while `free` allows, then `(False, None)` at
    the end or `(False, error)`; close `items` when done or stopped."""
    iterator = iter(items)
    try:
        while True:
            free.acquire()
            if stop.is_set():
                return
            try:
                item = next(iterator)
            except StopIteration:
                ready.put((False, None))
                return
            ready.put((True, item))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        ready.put((False, exc))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class Prefetch(Iterator[T]):
    """`items` iterated in a background thread, at most `depth` items ahead of the caller (the one being
    made included), so making the next items overlaps the caller's work on the current one. A caller
    that drops each item before asking for the next never has more than `depth + 1` items alive.
    Exceptions are re-raised in the caller; `close()` (or a caller that stops early and drops it) stops
    the thread and closes `items`. `ready()` says whether the next item can be had without waiting."""

    def __init__(self, items: Iterable[T], depth: int = STREAM_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._ready: queue.Queue[tuple[bool, object]] = queue.Queue()
        self._free = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._done = False
        # the thread holds only what it needs, not `self`: a dropped Prefetch is collected and closed
        self._thread = threading.Thread(
            target=_produce, args=(items, self._ready, self._free, self._stop), name="hyperowl-prefetch", daemon=True
        )
        self._thread.start()

    def ready(self) -> bool:
        """Whether `next` returns (an item, the end or an error) without waiting for the thread."""
        return self._done or not self._ready.empty()

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        ok, item = self._ready.get()
        if not ok:
            self.close()
            if item is not None:
                raise item  # type: ignore[misc]
            raise StopIteration
        self._free.release()
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the thread (after the item it is making) and close `items`."""
        if self._thread.is_alive() or not self._done:
            self._done = True
            self._stop.set()
            self._free.release()
            self._thread.join()

    def __del__(self) -> None:
        self.close()


@dataclass
class MediumViews:
    """The `count` views of one image or video in prompt order. `pieces(chunk_size)` gives them in lists
    (an image's or a decoded clip's at once; a planned video file's as it decodes them, at most
    `chunk_size` frames a list), anew at each call."""

    count: int
    pieces: Callable[[int], Iterable[list[Image.Image]]]


def image_views(views: list[Image.Image]) -> MediumViews:
    """Views already in memory (an image's tiles and global view, or a clip's frames)."""
    return MediumViews(len(views), lambda _: [views])


def video_views(plan: VideoPlan, frame_size: int, timestamps: list[float]) -> MediumViews:
    """The sampled frames of a planned video file, decoded (resized to `frame_size`) only when its
    pieces are iterated; `timestamps` receives their times as they are decoded.

    Iterating raises `MediaError` when the file gives fewer frames than its packet index promised
    (the prompt holds one `<|image|>` per promised frame)."""

    def pieces(chunk_size: int) -> Iterator[list[Image.Image]]:
        timestamps.clear()
        for clip in plan.chunks(chunk_size, progress=False, frame_size=frame_size):
            timestamps.extend(clip.timestamps)
            yield clip.frames
        if len(timestamps) != len(plan):
            raise MediaError(f"video {plan.name}: only {len(timestamps)} of its {len(plan)} sampled frames decode")

    return MediumViews(len(plan), pieces)


def view_chunks(media: Iterable[MediumViews], image_size: int, chunk_size: int) -> Iterator[torch.Tensor]:
    """Pixels `[n, 3, S, S]` of every view of `media` in order, `chunk_size` views a chunk across
    media (only the last chunk is shorter), so a model encoding `chunk_size` images at a time gets the
    same batches as from one tensor of every view."""
    pending: list[Image.Image] = []
    for medium in media:
        for piece in medium.pieces(chunk_size):
            pending.extend(piece)
            while len(pending) >= chunk_size:
                yield image_to_tensor(pending[:chunk_size], image_size)
                del pending[:chunk_size]
    if pending:
        yield image_to_tensor(pending, image_size)


def pixel_chunks(
    media: list[MediumViews],
    image_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    per_medium: bool = False,
    pin_memory: bool = False,
    depth: int = STREAM_DEPTH,
) -> Prefetch[torch.Tensor]:
    """The pixel chunks of `media` (see `view_chunks`), made in a background thread up to `depth`
    chunks ahead. `per_medium`: no chunk holds views of two media (each medium's views start a chunk).
    `pin_memory` pins each chunk, so its copy to a GPU overlaps the work."""
    if per_medium:
        chunks = (chunk for medium in media for chunk in view_chunks([medium], image_size, chunk_size))
    else:
        chunks = view_chunks(media, image_size, chunk_size)
    if pin_memory:
        chunks = (chunk.pin_memory() for chunk in chunks)
    return Prefetch(chunks, depth)


@dataclass(frozen=True)
class StreamedPixels:
    """The pixel chunks of `media` (`pixel_chunks`): each iteration makes them anew (a video file is
    decoded again), so one processor batch serves several model calls."""

    media: list[MediumViews]
    image_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    pin_memory: bool = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        return pixel_chunks(self.media, self.image_size, self.chunk_size, pin_memory=self.pin_memory)


def pixel_stream(
    media: list[MediumViews], image_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE, pin_memory: bool = False
) -> PixelStream:
    """`media` as a `PixelStream` for the model's `pixel_values`: the total is known now, the pixels
    are made (video files decoded) while the model encodes them."""
    return PixelStream(sum(m.count for m in media), StreamedPixels(media, image_size, chunk_size, pin_memory))
