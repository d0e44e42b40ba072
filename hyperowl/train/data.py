"""Training data: JSONL conversations (ms-swift layout) or in-memory synthetic tasks, encoded into
label-masked batches.

JSONL row: `{"messages": [{"role": "user", "content": "<|image|>..."}, {"role": "assistant", ...}],
"images": [...], "videos": [...]}`; media paths relative to the JSONL's folder. Rows that cannot be
used are reported with their line number and skipped or fatal (`on_bad_row`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import av
import torch
from PIL import Image

from hyperowl.errors import HyperowlError
from hyperowl.processing.processor import IGNORE_INDEX, Owl3Processor
from hyperowl.processing.template import ROLES
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.synthetic.guidance import Targets, VideoFacts, VideoGuide, collate_targets, video_facts
from hyperowl.synthetic.tasks import TaskMixture

log = logging.getLogger("hyperowl.train")


class DataError(HyperowlError, ValueError):
    """A training data row is malformed or names media that cannot be read."""


@dataclass
class Example:
    """One conversation to train on. `images`/`videos`: paths, PIL images or `VideoClip`s.
    `cut`: cut the images into tiles (None: the data set's setting). `where`: `file:line` for reports.
    `facts`: the ground truth of a synthetic video question, for `video_guidance`."""

    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    cut: bool | None = None
    where: str = ""
    facts: VideoFacts | None = None


def _row_problem(row: Any, folder: Path) -> str | None:
    """Why a parsed JSONL row cannot be trained on, or None if it is fine (media are opened)."""
    if not isinstance(row, dict):
        return "the row is not a JSON object"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"bad message {m!r}: needs role in {ROLES} and string content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    text = "".join(m["content"] for m in messages)
    for key, token in (("images", IMAGE_TOKEN), ("videos", VIDEO_TOKEN)):
        media = row.get(key, [])
        if not isinstance(media, list) or not all(isinstance(p, str) for p in media):
            return f"'{key}' must be a list of file paths"
        if text.count(token) != len(media):
            return f"{text.count(token)} {token} placeholder(s) but {len(media)} {key}"
        for p in media:
            path = folder / p
            if not path.is_file():
                return f"missing file {path}"
            problem = _media_problem(path, key)
            if problem:
                return problem
    return None


def _media_problem(path: Path, kind: str) -> str | None:
    try:
        if kind == "images":
            with Image.open(path) as image:
                image.verify()
        else:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    return f"no video stream in {path}"
    except (OSError, SyntaxError, ValueError, av.FFmpegError) as exc:
        return f"unreadable {kind[:-1]} {path}: {exc}"
    return None


class JsonlDataset:
    """The usable rows of a JSONL file; `dataset[i]` -> `Example`. Bad rows are reported on load."""

    def __init__(self, path: str | Path, on_bad_row: Literal["skip", "fail"] = "fail") -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"training file not found: {path}")
        self.path = path
        self.examples: list[Example] = []
        self.skipped: list[tuple[int, str]] = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = _row_problem(row, path.parent)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON: {exc}"
            where = f"{path}:{line_no}"
            if problem is not None:
                if on_bad_row == "fail":
                    raise DataError(f"{where}: {problem} (set on_bad_row: skip to skip such rows)")
                log.warning("skipping %s: %s", where, problem)
                self.skipped.append((line_no, problem))
                continue
            self.examples.append(
                Example(
                    messages=row["messages"],
                    images=[str(path.parent / p) for p in row.get("images", [])],
                    videos=[str(path.parent / p) for p in row.get("videos", [])],
                    where=where,
                )
            )
        if self.skipped:
            log.warning("skipped %d bad row(s) of %s", len(self.skipped), path)
        if not self.examples:
            raise DataError(f"no usable rows in {path}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class SyntheticDataset:
    """Endless synthetic samples (`hyperowl.synthetic`), videos as the frames the processor would sample.

    Samples `0 .. warmup_samples - 1` come from `warmup` (a curriculum's first stage) when given,
    the rest from `mixture`.
    """

    def __init__(
        self, mixture: TaskMixture, fps: float, max_frames: int, warmup: TaskMixture | None = None, warmup_samples: int = 0
    ) -> None:
        self.mixture = mixture
        self.fps = fps
        self.max_frames = max_frames
        self.warmup = warmup
        self.warmup_samples = warmup_samples if warmup is not None else 0

    def __getitem__(self, index: int) -> Example:
        s = (self.warmup if index < self.warmup_samples else self.mixture)[index]
        videos = [v.clip(self.fps, self.max_frames) for v in s.videos]
        facts = video_facts(s, videos[0].timestamps, index) if s.task == "video" else None
        return Example(s.messages, s.images, videos, s.cut, where=f"synthetic sample {index} ({s.task})", facts=facts)


@dataclass
class Encoded:
    """One tokenized conversation: `input_ids`, `labels` `[T]`, `seen` `[T]` (images strictly before each
    token), `pixel_values` `[n, 3, S, S]` (None without images) and the `video_guidance` attention targets."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    seen: torch.Tensor
    pixel_values: torch.Tensor | None
    guide_targets: Targets | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


def encode(processor: Owl3Processor, example: Example, cut_enable: bool, guide: VideoGuide | None = None) -> Encoded:
    """Tokenize `example` with labels on the assistant answers only (content, `<|im_end|>`, `<|endoftext|>`);
    with `guide` and `example.facts`, also the caption labels and attention targets of `video_guidance`."""
    cut = cut_enable if example.cut is None else example.cut
    try:
        batch = processor(
            example.messages,
            images=example.images,
            videos=example.videos,
            cut_enable=cut,
            add_generation_prompt=False,
            return_labels=True,
        )
    except HyperowlError as exc:
        raise DataError(f"{example.where}: {exc}") from exc
    offset = batch["media_offset"][0]
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    targets = guide.add_targets(input_ids, labels, example.facts) if guide is not None and example.facts is not None else None
    return Encoded(input_ids, labels, offset[:, 1] - offset[:, 0], batch["pixel_values"], targets)


def length_groups(lengths: list[int], groups: int) -> list[list[int]]:
    """Split item indices into `min(groups, len(lengths))` groups of similar length, with the fewest padded tokens.

    Items are sorted by length and cut into contiguous runs; a run costs `len(run) * longest` tokens
    once padded. Exact dynamic programming (fine for the batch sizes of a micro-batch). The number of
    groups never depends on the lengths, so every process of a job runs as many model batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    groups = max(1, min(groups, n))
    inf = float("inf")
    # best[g][j]: least padded tokens for the first j sorted items in g runs; cut[g][j]: where the last run starts.
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[g - 1][i] + (j - i) * sorted_lengths[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g, runs, j = groups, [], n
    while j > 0:
        i = cut[g][j]
        runs.append(order[i:j])
        j, g = i, g - 1
    return runs[::-1]


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Left-pad encoded conversations into one model batch (the processor's batch layout).

    Returns `input_ids`, `attention_mask`, `labels` `[B, T]`, `media_offset` `[B, T, 2]` and
    `pixel_values` `[sum n_b, 3, S, S]` (sample 0's images first) or None; with attention targets,
    also `guide_targets` (`collate_targets`).
    """
    length = max(item.input_ids.shape[0] for item in items)
    b = len(items)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    seen = torch.zeros((b, length), dtype=torch.long)
    firsts = []
    first = 0
    for row, item in enumerate(items):
        t = item.input_ids.shape[0]
        input_ids[row, length - t :] = item.input_ids
        labels[row, length - t :] = item.labels
        attention_mask[row, length - t :] = 1
        seen[row, length - t :] = item.seen
        firsts.append(first)
        first += item.num_images
    start = torch.tensor(firsts, dtype=torch.long)[:, None].expand(b, length)
    pixels = [item.pixel_values for item in items if item.pixel_values is not None]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "media_offset": torch.stack([start, start + seen], dim=-1),
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
    if any(item.guide_targets for item in items):
        lengths = [item.input_ids.shape[0] for item in items]
        batch["guide_targets"] = collate_targets([item.guide_targets for item in items], lengths, length)
    return batch


class MicroBatches(torch.utils.data.Dataset):
    """Item `k` = the `k`-th micro-batch of this process, collated (usable by a `DataLoader` with workers)
    as a list of `min(length_groups, batch)` model batches of similar-length conversations (see
    `length_groups`; the summed loss is the same, the padding is less).

    Optimizer step `s` uses global sample positions `[s*G, (s+1)*G)` with `G = batch * accum * world`;
    rank `r` takes the contiguous slice `r*batch*accum ...` of them, `batch` per micro-batch. Position
    `p` of a finite data set of N rows is row `perm(p // N)[p % N]`, a fresh seeded permutation per epoch.
    """

    def __init__(
        self,
        dataset: JsonlDataset | SyntheticDataset,
        processor: Owl3Processor,
        cut_enable: bool,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        total_steps: int,
        length_groups: int = 1,
        guide: VideoGuide | None = None,
    ) -> None:
        self.dataset = dataset
        self.processor = processor
        self.cut_enable = cut_enable
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.total_steps = total_steps
        self.length_groups = length_groups
        self.guide = guide
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.total_steps * self.grad_accum

    def row(self, position: int) -> int:
        if isinstance(self.dataset, SyntheticDataset):
            return position
        n = len(self.dataset)
        epoch = position // n
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(n, generator=generator).tolist()}
        return self._perms[epoch][position % n]

    def positions(self, k: int) -> range:
        """Global sample positions of micro-batch `k` of this rank."""
        step, micro = divmod(k, self.grad_accum)
        per_rank = self.batch_size * self.grad_accum
        start = step * per_rank * self.world_size + self.rank * per_rank + micro * self.batch_size
        return range(start, start + self.batch_size)

    def __getitem__(self, k: int) -> list[dict[str, torch.Tensor | None]]:
        items = [encode(self.processor, self.dataset[self.row(p)], self.cut_enable, self.guide) for p in self.positions(k)]
        runs = length_groups([item.input_ids.shape[0] for item in items], self.length_groups)
        return [collate([items[i] for i in run], self.processor.pad_token_id) for run in runs]
