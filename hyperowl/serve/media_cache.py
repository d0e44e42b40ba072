"""Vision features of images and videos kept across requests, by content: a second question about the same
film skips decoding and the vision tower.

What is kept per medium is its prompt expansion (the placeholder text the processor writes for it: one
`<|image|>` per view, cut grid or video frame markers) and the projected features of its views (`[views,
tokens_per_image, H]`, after the vision tower and the projector). The visual K/V of the hyper layers are
not kept: they carry the MI-Rope position of each image in the prompt, which differs from request to
request, and turning features into K/V is a small part of the work. Features are stored on the CPU
(pinned when the model is on a GPU) and bounded in bytes; the least recently used go first.

The key is the medium's bytes (SHA-256) with everything that changes its views: kind, frame rate,
`max_frames`, sampling mode, cutting, image size and prompt format.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperowl.model.owl3 import Owl3Model, PixelStream
from hyperowl.processing.stream import MediumViews, Prefetch, pixel_chunks

#: Bytes read at a time when hashing a media file.
HASH_BLOCK = 2**20


@dataclass
class CachedMedium:
    """One image or video as a prompt sees it: its expanded placeholder text and its views' features."""

    placeholder: str
    features: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


@dataclass
class MediumInput:
    """One medium of a request, in prompt order: found in the cache (`features`) or to be encoded and
    kept under `key` (`views`: an image's views, or a video file's frames, decoded while they are encoded)."""

    key: str
    placeholder: str
    features: torch.Tensor | None = None
    views: MediumViews | None = None

    @property
    def count(self) -> int:
        """The medium's views (images the model sees)."""
        return self.features.shape[0] if self.features is not None else self.views.count  # type: ignore[union-attr]


class ReadyChunks(Iterator[torch.Tensor]):
    """The chunks of `chunks`, made from the pixels of `source`: ready when `source` is (a kept
    medium's features are always there, but its turn may come only after pixels still decoding)."""

    def __init__(self, chunks: Iterator[torch.Tensor], source: Prefetch[torch.Tensor]) -> None:
        self.chunks, self.source = chunks, source

    def __next__(self) -> torch.Tensor:
        return next(self.chunks)

    def ready(self) -> bool:
        return self.source.ready()

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        self.source.close()


def media_key(source: bytes | Path, settings: tuple) -> str:
    """SHA-256 of the medium's bytes (a file is read in blocks) and of the `settings` that change its views."""
    digest = hashlib.sha256(repr(settings).encode())
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with open(source, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


class MediaCache:
    """Least-recently-used features of media, at most `max_bytes` in all (0 keeps nothing). Thread-safe:
    requests look media up in worker threads, the scheduler thread stores what it encoded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedMedium] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedMedium | None:
        """The entry under `key` (now the most recently used), counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CachedMedium) -> None:
        """Keep `entry`, dropping the least recently used ones until it fits (one larger than the whole
        cache is not kept)."""
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes

    def feature_stream(self, model: Owl3Model, media: list[MediumInput], chunk_size: int | None = None) -> PixelStream:
        """The features of `media` in prompt order as a `PixelStream` for the model: cached ones as they
        are; the others' pixels made (video files decoded) in a background thread, `chunk_size` views a
        chunk, while the chunks before are encoded, then kept for later requests. Iterate it where the
        model runs (the scheduler thread), once."""
        chunk = chunk_size or model.visual_options.chunk_size
        new = [medium.views for medium in media if medium.views is not None]
        pin = model.device.type == "cuda"
        pixels = pixel_chunks(new, model.config.vision_config.image_size, chunk, per_medium=True, pin_memory=pin)

        def chunks() -> Iterator[torch.Tensor]:
            for medium in media:
                if medium.features is not None:
                    yield medium.features
                    continue
                kept, made = [], 0
                while made < medium.count:
                    features = model.encode_chunk(next(pixels))  # the pixels are freed before the next chunk is asked for
                    kept.append(features.to("cpu"))
                    made += features.shape[0]
                    yield features
                stored = torch.cat(kept)
                self.put(medium.key, CachedMedium(medium.placeholder, stored.pin_memory() if pin else stored))

        return PixelStream(sum(medium.count for medium in media), ReadyChunks(chunks(), pixels))
