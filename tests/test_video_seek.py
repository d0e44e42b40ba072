"""Video sampling by seeking: ``exact`` equals a one-pass decode frame for frame, ``keyframe`` returns
the nearest keyframes with their own timestamps, on files with several keyframe intervals, B-frames,
a variable frame rate, mkv/webm/avi containers, cut-off files and too-large frames."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import hyperowl.processing.video as video_module
from hyperowl.errors import MediaError
from hyperowl.processing.video import VideoClip, count_sampled_frames, iter_video_chunks, load_video, plan_video
from tests.media import write_pattern_video

FPS = 8


def _full(path: Path, suffix: str, codec: str, frames: int = 80, **kwargs) -> Path:
    return write_pattern_video(path / f"full.{suffix}", frames, codec, fps=FPS, **kwargs)


def _cut(source: Path, keep: float) -> Path:
    """The first ``keep`` of the file's bytes (a download cut off, the header still claims the whole)."""
    data = source.read_bytes()
    cut = source.with_name(f"cut{source.suffix}")
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


KINDS = {
    "mp4 h264, B-frames, 10 keyframe intervals": lambda d: _full(d, "mp4", "libx264", keyframe_interval=8, b_frames=2),
    "mkv h264, B-frames, variable frame rate": lambda d: _full(
        d,
        "mkv",
        "libx264",
        keyframe_interval=10,
        b_frames=2,
        pts=[i * 125 + (i % 3) * 40 for i in range(80)],
        time_base=Fraction(1, 1000),
    ),
    "webm vp9": lambda d: _full(d, "webm", "libvpx-vp9", 60, keyframe_interval=12),
    "avi mpeg4, B-frames": lambda d: _full(d, "avi", "mpeg4", keyframe_interval=12, b_frames=2),
    "mkv cut at 60%": lambda d: _cut(_full(d, "mkv", "libx264", keyframe_interval=8, b_frames=2), 0.6),
    "avi cut at 60% (header claims 80 frames)": lambda d: _cut(_full(d, "avi", "mpeg4", keyframe_interval=8, b_frames=2), 0.6),
}


@pytest.fixture(scope="module", params=list(KINDS))
def video(request, tmp_path_factory) -> Path:
    return KINDS[request.param](tmp_path_factory.mktemp("seek"))


def _every_frame(path: Path) -> list[tuple[float, np.ndarray]]:
    """(time since stream start, RGB pixels) of every frame, decoded by PyAV alone in one pass."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return [(frame.time - start, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]


def _keyframe_times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        pts = sorted(p.pts for p in container.demux(stream) if p.size and p.is_keyframe)
        return [float(p * stream.time_base) - start for p in pts]


def _pixels(clip: VideoClip) -> list[np.ndarray]:
    return [np.asarray(frame) for frame in clip.frames]


class _CountingContainer:
    """A PyAV input container that counts the frames it decodes and the seeks it makes."""

    def __init__(self, container, counts: dict[str, int]) -> None:
        self._container, self._counts = container, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._counts["closed"] = self._counts.get("closed", 0) + 1
        self._container.close()

    def __getattr__(self, name):
        return getattr(self._container, name)

    def seek(self, *args, **kwargs):
        self._counts["seeks"] += 1
        return self._container.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._counts["decoded"] += 1
            yield frame


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("max_frames", [None, 7])
def test_exact_equals_one_pass_decode(video, max_frames, workers, monkeypatch):
    monkeypatch.setattr(video_module, "DECODE_WORKERS", workers)
    scan = load_video(video, fps=FPS, max_frames=max_frames, sampling="scan", progress=False)
    exact = load_video(video, fps=FPS, max_frames=max_frames, sampling="exact", progress=False)
    assert len(exact) == len(scan) == len(plan_video(video, fps=FPS, max_frames=max_frames)) > 0
    assert exact.timestamps == scan.timestamps
    for a, b in zip(_pixels(exact), _pixels(scan), strict=True):
        np.testing.assert_array_equal(a, b)
    reference = _every_frame(video)
    if max_frames is None:  # every frame: the one-pass sampler is PyAV's own decode
        assert scan.timestamps == pytest.approx([t for t, _ in reference])
        for a, (_, b) in zip(_pixels(scan), reference, strict=True):
            np.testing.assert_array_equal(a, b)


def test_exact_chunks_match_load_video(video):
    chunks = list(iter_video_chunks(video, 3, fps=FPS, max_frames=None, sampling="exact", progress=False))
    whole = load_video(video, fps=FPS, max_frames=None, sampling="scan", progress=False)
    assert [len(c) for c in chunks[:-1]] == [3] * (len(chunks) - 1)
    assert [t for c in chunks for t in c.timestamps] == whole.timestamps
    for a, b in zip([np.asarray(f) for c in chunks for f in c.frames], _pixels(whole), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keyframe_mode_takes_nearest_keyframes(video):
    keyframes = _keyframe_times(video)
    every = _every_frame(video)
    wanted = load_video(video, fps=FPS, max_frames=5, sampling="exact", progress=False).timestamps
    clip = load_video(video, fps=FPS, max_frames=5, sampling="keyframe", progress=False)
    assert len(clip) == len(wanted)
    for want, got, pixels in zip(wanted, clip.timestamps, _pixels(clip), strict=True):
        nearest = min(keyframes, key=lambda k: (abs(k - want), k))
        assert got == pytest.approx(nearest)
        (reference,) = [p for t, p in every if t == pytest.approx(got)]
        np.testing.assert_array_equal(pixels, reference)


def test_exact_seeks_instead_of_decoding_everything(tmp_path):
    path = write_pattern_video(tmp_path / "long.mp4", 400, fps=FPS, keyframe_interval=40, b_frames=2)
    plan = plan_video(path, fps=FPS, max_frames=4, sampling="exact")
    counts = {"seeks": 0, "decoded": 0}
    opened = plan.open_container
    plan.open_container = lambda: _CountingContainer(opened(), counts)
    clip = VideoClip([], [])
    for chunk in plan.chunks(2, progress=False):
        clip.frames += chunk.frames
        clip.timestamps += chunk.timestamps
    scan = load_video(path, fps=FPS, max_frames=4, sampling="scan", progress=False)
    assert clip.timestamps == scan.timestamps and len(scan) == 4
    for a, b in zip(_pixels(clip), _pixels(scan), strict=True):
        np.testing.assert_array_equal(a, b)
    # One seek per sampled frame (each in its own keyframe interval), and at most one keyframe
    # interval plus the decoder's reordering delay decoded per sample, not the 400 frames.
    assert counts["seeks"] == 4
    assert counts["decoded"] <= 4 * (40 + 4)


@pytest.mark.parametrize("sampling", ["exact", "keyframe"])
def test_parallel_seeking_stops_cleanly_when_the_consumer_stops(tmp_path, monkeypatch, sampling):
    """Several decode threads, each with its own open file: a consumer that stops after the first
    chunk leaves no thread running and every file closed."""
    monkeypatch.setattr(video_module, "DECODE_WORKERS", 3)
    path = write_pattern_video(tmp_path / "long.mp4", 240, fps=FPS, keyframe_interval=8, b_frames=2)
    plan = plan_video(path, fps=FPS, max_frames=24, sampling=sampling)
    counts = {"seeks": 0, "decoded": 0, "opened": 0}
    opened = plan.open_container

    def open_counted():
        counts["opened"] += 1
        return _CountingContainer(opened(), counts)

    plan.open_container = open_counted
    converted = []
    convert = video_module._converted
    monkeypatch.setattr(video_module, "_converted", lambda *a: (converted.append(1) or item for item in convert(*a)))
    chunks = plan.chunks(4, progress=False)
    first = next(chunks)
    chunks.close()
    converted_before_stop = len(converted)
    assert len(first) == 4 and first.timestamps == load_video(path, fps=FPS, max_frames=24, sampling=sampling).timestamps[:4]
    assert 1 < counts["opened"] <= 3 and counts["closed"] == counts["opened"]
    assert converted_before_stop <= 4 + 2 * 3  # the chunk handed on, and at most two frames per thread ahead of it
    assert not [t for t in threading.enumerate() if t.name.startswith("hyperowl-decode")]


def test_header_that_claims_more_frames_than_the_file_holds(tmp_path):
    cut = _cut(_full(tmp_path, "avi", "mpeg4", keyframe_interval=8), 0.5)
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 80  # what the header claims
    frames = len(_every_frame(cut))
    assert 0 < frames < 80
    assert count_sampled_frames(cut, fps=FPS, max_frames=None) == frames
    assert len(load_video(cut, fps=FPS, max_frames=None, progress=False)) == frames


def test_video_errors_before_decoding(tmp_path):
    big = write_pattern_video(tmp_path / "4k.mp4", 1, size=(3840, 2160))
    with pytest.raises(MediaError, match=r"video frames too large: .*4k.mp4 has 3840 x 2160 pixel frames > limit of 2073600"):
        load_video(big, max_pixels=1920 * 1080)
    with pytest.raises(MediaError, match="video frames too large"):
        count_sampled_frames(big, max_pixels=1920 * 1080)
    assert len(load_video(big, progress=False, sampling="keyframe")) == 1
    cut_mp4 = _cut(_full(tmp_path, "mp4", "libx264"), 0.6)  # mp4 keeps its index at the end
    with pytest.raises(MediaError, match="cannot read video .*cut.mp4"):
        load_video(cut_mp4)
    with pytest.raises(MediaError, match="unknown video sampling 'fast'; use one of exact, keyframe, scan"):
        load_video(big, sampling="fast")
