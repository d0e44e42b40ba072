"""Continuous batching: requests prefilled one by one (`hyperowl.engine.generate.prefill`) join a running decode batch and leave it when done.

A `DecodeBatch` holds one text KV cache and one `VisualKV` for all running rows. A row without
images gets an empty visual row (`num_images = 0`, zero-length K/V padded with zeros by
`VisualKV.concat`), which the model treats as "sees no image"; when no running row has an image
left, the batch drops its visual K/V altogether.

On a GPU, once the rows have stayed the same for `graph_after` steps, the batch reserves the room its
rows may still need and replays its decode step from a CUDA graph (`DecodeStep`); a join or a leave
goes back to eager steps until the rows settle again, so a burst of arrivals does not pay a capture
for every change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hyperowl.engine.generate import DecodeStep
from hyperowl.model.cache import TextKVCache, VisualKV

if TYPE_CHECKING:
    from hyperowl.model.owl3 import Owl3Model


def empty_visual(like: VisualKV, rows: int) -> VisualKV:
    """A `VisualKV` of `rows` rows without images, shaped (layers, heads, dtype, device) like `like`."""
    return VisualKV(
        [k.new_zeros(rows, k.shape[1], 0, k.shape[3]) for k in like.keys],
        [v.new_zeros(rows, v.shape[1], 0, v.shape[3]) for v in like.values],
        torch.zeros(rows, dtype=torch.long, device=like.num_images.device),
        like.tokens_per_image,
    )


def stack_visual(first: VisualKV | None, first_rows: int, second: VisualKV | None, second_rows: int) -> VisualKV | None:
    """Rows of `first` then rows of `second`; a side without images (None) gets empty visual rows."""
    if first is None and second is None:
        return None
    like = first if first is not None else second
    assert like is not None
    return VisualKV.concat(
        [
            first if first is not None else empty_visual(like, first_rows),
            second if second is not None else empty_visual(like, second_rows),
        ]
    )


class DecodeBatch:
    """The running rows of a continuously batched decode.

    `join` appends a prefilled request (its own batch-1 cache and visual K/V), `keep` drops finished
    rows, `step` runs one decode forward for every row and returns the next-token logits.
    """

    def __init__(self, model: Owl3Model, graph_after: int = 4, graphs: bool | None = None) -> None:
        """`graph_after`: steps with unchanged rows before the step is captured in a CUDA graph;
        `graphs`: whether to capture at all (None: when the model is on a CUDA device)."""
        self.model = model
        self.cache: TextKVCache | None = None
        self.visual: VisualKV | None = None
        self._step: DecodeStep | None = None  # for the current rows; rebuilt when they change
        self.graph_after = graph_after
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self._steady = 0  # steps since the rows last changed
        self._graphed = False  # whether `_step` was made to replay a graph

    @property
    def size(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    def join(self, cache: TextKVCache, visual: VisualKV | None) -> None:
        """Append the rows of a prefilled `cache` (with `visual`, or None when it has no images)."""
        self._step, self._steady, self._graphed = None, 0, False
        if self.cache is None:
            self.cache, self.visual = cache, visual
            return
        self.visual = stack_visual(self.visual, self.cache.batch_size, visual, cache.batch_size)
        self.cache = TextKVCache.concat([self.cache, cache])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current rows, in order)."""
        if self.cache is None or rows == list(range(self.size)):
            return
        self._step, self._steady, self._graphed = None, 0, False
        if not rows:
            self.cache = self.visual = None
            return
        self.cache.select(rows)
        if self.visual is not None:
            visual = self.visual.select(rows)
            self.visual = visual if bool(visual.num_images.any()) else None

    def step(self, tokens: torch.Tensor, room: int | None = None) -> torch.Tensor:
        """Feed one token per row (`[B]`) and return the next-token logits `[B, vocab]` (with a graph:
        a buffer the next step overwrites). `room`: the most tokens any row may still take, this one
        included; without it the step is never graphed (a graph cannot grow the cache)."""
        if self.cache is None:
            raise RuntimeError("step() on an empty batch")
        if self._step is None:
            self._step = DecodeStep(self.model, self.cache, self.visual)
        elif self.graphs and room is not None and not self._graphed and self._steady >= self.graph_after:
            self.cache.reserve(room)
            self._step, self._graphed = DecodeStep(self.model, self.cache, self.visual, graph=True), True
        self._steady += 1
        return self._step(tokens.to(self.model.device))
