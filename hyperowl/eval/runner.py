"""Batched, resumable, sharded inference over evaluation requests.

Results go to ``predictions.jsonl`` in the run folder. Under ``torchrun`` (or any launcher setting
``RANK``/``WORLD_SIZE``) rank ``r`` takes every ``world_size``-th request starting at ``r`` and
appends its records to ``predictions.rank{r}.jsonl``; after a barrier rank 0 merges every shard
into ``predictions.jsonl`` (request order) and deletes the shards. Requests whose id already has
a record (in the merged file or any shard) are skipped, so a stopped run resumes where it stopped,
with any number of processes. A shard's half-written last line (a process killed while writing) is cut
off before new records are appended, and the merge fails loudly unless every request has exactly one
record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.errors import HyperowlError, MediaError
from hyperowl.eval.data import FRAME_EXTENSIONS
from hyperowl.eval.scoring import Record, score_response
from hyperowl.eval.tasks import EvalRequest, build_messages
from hyperowl.model.owl3 import Owl3Model
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.video import VideoClip, VideoPlan, load_video, plan_video, sample_frame_indices

#: Merged results of a run.
PREDICTIONS = "predictions.jsonl"

CUT_MODES = ("auto", "on", "off")


@dataclass
class RunOptions:
    """How requests are run.

    Attributes:
        batch_size: most conversations per ``generate`` call.
        max_batch_images: most images (cut tiles and video frames not counted separately: one per
            image or ``max_frames`` per video) per call; a single larger request still runs alone.
        max_new_tokens: answer length cap (a letter needs few).
        max_frames: most frames sampled per video.
        fps: frames per second sampled before the ``max_frames`` cap.
        cut: ``auto`` cuts the image of single-image prompts only, ``on`` always, ``off`` never.
        vision_chunk_size: images per vision-tower call (None: all at once).
        progress: show a progress bar (rank 0 only).
    """

    batch_size: int = 8
    max_batch_images: int = 256
    max_new_tokens: int = 16
    max_frames: int = 16
    fps: float = 1.0
    cut: str = "auto"
    vision_chunk_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_batch_images < 1 or self.max_new_tokens < 1 or self.max_frames < 1:
            raise ValueError("batch_size, max_batch_images, max_new_tokens and max_frames must be >= 1")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.cut not in CUT_MODES:
            raise ValueError(f"cut must be one of {CUT_MODES}, got {self.cut!r}")


@dataclass
class Distributed:
    """This process's place among the evaluation processes, and a barrier across them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        """Wait for every process (no-op when alone)."""
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed() -> Distributed:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and, when there are several
    processes, join their gloo process group (used only for barriers, on CPU or GPU machines)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank)


def shard_file(out_dir: Path, rank: int) -> Path:
    """Per-rank results file."""
    return out_dir / f"predictions.rank{rank}.jsonl"


class PredictionsError(HyperowlError, RuntimeError):
    """The run folder's records do not give every request exactly one answer."""


def read_records(out_dir: Path) -> dict[str, Record]:
    """Every record in the run folder (merged file first, then shards), first per id wins.

    A truncated last line (a run killed while writing) is ignored.
    """
    return {id_: found[0] for id_, found in read_all_records(out_dir).items()}


def read_all_records(out_dir: Path) -> dict[str, list[Record]]:
    """Every record in the run folder per id, in file order (merged file first, then shards)."""
    records: dict[str, list[Record]] = {}
    files = [out_dir / PREDICTIONS, *sorted(out_dir.glob("predictions.rank*.jsonl"))]
    for file in files:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = Record.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            records.setdefault(record.id, []).append(record)
    return records


def cut_partial_line(path: Path) -> None:
    """Truncate `path` after its last newline, dropping a line a killed process left half-written."""
    if not path.is_file():
        return
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        position = size
        while position > 0:
            step = min(65536, position)
            fh.seek(position - step)
            newline = fh.read(step).rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
        if position < size:
            fh.truncate(position)


def request_video(request: EvalRequest, fps: float, max_frames: int) -> VideoClip | VideoPlan:
    """The request's video, sampled at ``fps`` and then uniformly down to ``max_frames``: a whole file
    as a :class:`VideoPlan` (its frames decode when the processor, or the model it streams them to,
    asks for them); a frame folder, or a file limited to ``video_window``, decoded now, since its frames
    are chosen by their times. A window that holds no sampled frame falls back to the whole video."""
    if request.item.video is None:
        raise ValueError(f"request {request.id} has no video")
    source = Path(request.item.video)
    if source.is_dir():
        frames = sorted(p for p in source.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
        if not frames:
            raise MediaError(f"frame folder has no images: {source}")
        rate = request.item.frame_rate or fps
        clip = load_video(frames, fps=fps, max_frames=None, frame_rate=rate)
    elif request.item.video_window is None:
        return plan_video(source, fps=fps, max_frames=max_frames)
    else:
        clip = load_video(source, fps=fps, max_frames=None, progress=False)
    if request.item.video_window:
        start, end = request.item.video_window
        inside = [i for i, t in enumerate(clip.timestamps) if start <= t <= end]
        if inside:
            clip = VideoClip([clip.frames[i] for i in inside], [clip.timestamps[i] for i in inside])
    keep = sample_frame_indices(len(clip), fps, fps, max_frames)
    return VideoClip([clip.frames[i] for i in keep], [clip.timestamps[i] for i in keep])


def _cuts(request: EvalRequest, mode: str) -> bool:
    return mode == "on" or (mode == "auto" and len(request.item.images) == 1 and request.item.video is None)


def _batches(requests: Sequence[EvalRequest], options: RunOptions) -> Iterator[list[EvalRequest]]:
    """Consecutive requests grouped by cut setting, up to ``batch_size`` and ``max_batch_images``."""
    batch: list[EvalRequest] = []
    images = 0
    for request in requests:
        weight = len(request.item.images) + (options.max_frames if request.item.video else 0)
        if batch and (
            len(batch) == options.batch_size
            or images + weight > options.max_batch_images
            or _cuts(request, options.cut) != _cuts(batch[0], options.cut)
        ):
            yield batch
            batch, images = [], 0
        batch.append(request)
        images += weight
    if batch:
        yield batch


def _generate(model: Owl3ForCausalLM, processor: Owl3Processor, batch: list[EvalRequest], options: RunOptions) -> list[str]:
    """Answers to a batch of requests (one processor batch, one ``generate`` call). hyperowl's model
    gets the pixels streamed (video files decode while it encodes the frames before); another model
    (the LLaVA baseline) gets one tensor."""
    videos = [[request_video(r, options.fps, options.max_frames)] if r.item.video else None for r in batch]
    stream = {}
    if isinstance(model, Owl3Model):
        stream = {"stream_video": True, "stream_chunk_size": options.vision_chunk_size or model.visual_options.chunk_size}
    inputs = processor(
        [build_messages(r) for r in batch],
        images=[list(r.item.images) or None for r in batch],
        videos=videos,
        cut_enable=_cuts(batch[0], options.cut),
        **stream,
    ).to(model.device, model.dtype)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            stop_token_ids=processor.stop_token_ids,
            vision_chunk_size=options.vision_chunk_size,
        )
    return [
        processor.decode(sequence[:count].tolist(), skip_special_tokens=True).strip()
        for sequence, count in zip(output.sequences, output.num_generated)
    ]


def _run_batch(model: Owl3ForCausalLM, processor: Owl3Processor, batch: list[EvalRequest], options: RunOptions) -> list[Record]:
    """Records for a batch; when the batch fails (bad input, GPU out of memory), requests are retried one by one and
    the failing ones are recorded with their error (and count as wrong)."""
    try:
        return [score_response(r, text) for r, text in zip(batch, _generate(model, processor, batch, options))]
    except (HyperowlError, torch.cuda.OutOfMemoryError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [score_response(batch[0], "", error=f"{type(exc).__name__}: {exc}")]
    return [record for request in batch for record in _run_batch(model, processor, [request], options)]


def merge_shards(out_dir: Path, requests: Sequence[EvalRequest]) -> list[Record]:
    """Merge every shard into ``predictions.jsonl`` (requests' order first, then records of other
    ids, e.g. from an earlier larger run), delete the shards, and return the requests' records.

    Raises:
        PredictionsError: a request has no record, or two different ones (the shards are kept).
    """
    found = read_all_records(out_dir)
    missing = [request.id for request in requests if request.id not in found]
    conflicting = [id_ for id_, copies in found.items() if any(copy != copies[0] for copy in copies[1:])]
    if missing or conflicting:
        raise PredictionsError(
            f"{out_dir}: {len(missing)} of {len(requests)} requests have no record (first: {missing[:3]}), "
            f"{len(conflicting)} have differing records (first: {conflicting[:3]}); nothing was merged"
        )
    records = {id_: copies[0] for id_, copies in found.items()}
    order = {request.id: n for n, request in enumerate(requests)}
    ordered = sorted(records.values(), key=lambda r: (order.get(r.id, len(order)), r.id))
    tmp = out_dir / (PREDICTIONS + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in ordered:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(out_dir / PREDICTIONS)
    for shard in out_dir.glob("predictions.rank*.jsonl"):
        shard.unlink()
    return [record for record in ordered if record.id in order]


def run_requests(
    model: Owl3ForCausalLM,
    processor: Owl3Processor,
    requests: Sequence[EvalRequest],
    out_dir: str | Path,
    options: RunOptions,
    dist: Distributed | None = None,
    on_batch: Callable[[list[Record]], None] | None = None,
) -> list[Record] | None:
    """Run this process's share of ``requests`` not yet in ``out_dir`` and append the records.

    Returns the merged records of all requests on rank 0 (after every rank finished), None on the
    other ranks. ``on_batch`` is called with each new batch of records.
    """
    dist = dist or Distributed()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [request.id for request in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    done = read_records(out_dir)
    # every rank reads the folder before any rank writes to it
    dist.barrier()
    mine = [r for r in requests[dist.rank :: dist.world_size] if r.id not in done]
    cut_partial_line(shard_file(out_dir, dist.rank))
    with (
        shard_file(out_dir, dist.rank).open("a", encoding="utf-8") as fh,
        tqdm(total=len(mine), desc="eval", unit="prompt", disable=not options.progress or dist.rank != 0) as bar,
    ):
        for batch in _batches(mine, options):
            records = _run_batch(model, processor, batch, options)
            for record in records:
                fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(records)
    dist.barrier()
    if dist.rank != 0:
        return None
    return merge_shards(out_dir, requests)
