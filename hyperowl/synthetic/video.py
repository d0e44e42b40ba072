"""Synthetic videos: shapes that appear one after another at known times, in memory or as mp4 (PyAV)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from hyperowl.processing.video import VideoClip, sample_frame_indices
from hyperowl.synthetic.draw import COLOURS, SHAPES, Item, centred_box, draw_item

#: Frame rate of the written mp4 files.
NATIVE_FPS = 4


@dataclass(frozen=True)
class Event:
    """`item` is visible from `start` (inclusive) to `end` (exclusive), in seconds."""

    item: Item
    start: float
    end: float


@dataclass
class SyntheticVideo:
    """A `size x size` video of `duration` seconds on a plain `shade` grey background; one event at a time."""

    size: int
    duration: float
    shade: int
    events: list[Event]

    def event_at(self, t: float) -> int | None:
        """Index of the event visible at time `t` seconds, None for the empty background."""
        return next((i for i, event in enumerate(self.events) if event.start <= t < event.end), None)

    def frame_at(self, t: float) -> Image.Image:
        """The picture shown at time `t` seconds."""
        image = Image.new("RGB", (self.size, self.size), (self.shade,) * 3)
        index = self.event_at(t)
        if index is not None:
            draw_item(image, self.events[index].item)
        return image

    def num_frames(self, native_fps: int = NATIVE_FPS) -> int:
        return round(self.duration * native_fps)

    def clip(self, fps: float = 1.0, max_frames: int | None = 16, native_fps: int = NATIVE_FPS) -> VideoClip:
        """The frames `hyperowl.processing.video.load_video(fps, max_frames)` takes from the written file."""
        indices = sample_frame_indices(self.num_frames(native_fps), native_fps, fps, max_frames)
        times = [i / native_fps for i in indices]
        return VideoClip([self.frame_at(t) for t in times], times)

    def write_mp4(self, path: str | Path, native_fps: int = NATIVE_FPS) -> None:
        """Encode as H.264 mp4 (yuv420p, near-lossless quality so colours survive the tiny frames)."""
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=native_fps)
            stream.width = stream.height = self.size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "10"}
            for j in range(self.num_frames(native_fps)):
                frame = av.VideoFrame.from_ndarray(np.asarray(self.frame_at(j / native_fps)), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def random_video(rng: random.Random, size: int, count: int) -> SyntheticVideo:
    """`count` distinct shapes, each shown for 1-2 s, separated by 0-1 s of empty background.

    Start and end times are multiples of 1/NATIVE_FPS, and every event lasts at least 1 s, so
    sampling one frame per second always sees every event at least once, in order.
    """
    combos = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    step = 1 / NATIVE_FPS
    t = 0.0
    events = []
    for colour, shape in combos:
        length = rng.randint(NATIVE_FPS, 2 * NATIVE_FPS) * step
        item = Item(colour, shape, centred_box(rng, size))
        events.append(Event(item, t, t + length))
        t += length + rng.randint(0, NATIVE_FPS) * step
    return SyntheticVideo(size, t, rng.randint(20, 50), events)
