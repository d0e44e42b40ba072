"""Continuous batching: requests prefilled one by one (`hyperowl.engine.generate.prefill`) join a running decode batch and leave it when done.

A `DecodeBatch` holds one text KV cache and one `VisualKV` for all running rows. A row without
images gets an empty visual row (`num_images = 0`, zero-length K/V padded with zeros by
`VisualKV.concat`), which the model treats as "sees no image"; when no running row has an image
left, the batch drops its visual K/V altogether.

On a GPU, once the batch's buffers have stayed the same for `graph_after` steps, the batch reserves
the room its rows may still need and replays its decode step from a CUDA graph (`DecodeStep`).

Rows without images live in slots (on a GPU): the text cache has a power-of-two number of rows (the
batch-size bucket), a row that leaves frees its slot and a row that joins is copied into a free one,
in place, so the captured graph of the bucket stays valid across joins and leaves (free slots decode a
dummy token that nobody reads). The bucket grows when the slots are full and shrinks to fit after
`shrink_after` steps with at most a quarter of them used, and columns that no row uses any more are dropped in place; only
these, a row longer than the write index, or a cache that must grow change the buffers and need a new
graph. A row with images makes the batch compact (every row a slot, no free ones): a decode step's
cross-attention plan is fixed by the images each row has, so any join or leave there needs a new graph,
which is captured once the rows have settled again, so a burst of arrivals does not pay a capture for
every change.
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

    def __init__(
        self, model: Owl3Model, graph_after: int = 4, graphs: bool | None = None, slots: bool | None = None, shrink_after: int = 64
    ) -> None:
        """`graph_after`: steps with unchanged buffers before the step is captured in a CUDA graph;
        `graphs`: whether to capture at all (None: when the model is on a CUDA device); `slots`: whether
        rows without images keep slots in a bucket (None: when graphs are captured); `shrink_after`:
        steps with at most a quarter of the slots used before the bucket shrinks to fit."""
        self.model = model
        self.cache: TextKVCache | None = None
        self.visual: VisualKV | None = None
        self._step: DecodeStep | None = None  # over the current buffers; rebuilt when they change
        self.graph_after = graph_after
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.slots = self.graphs if slots is None else slots
        self.slot_of: list[int] = []  # the cache row of each running row, in row order
        self.shrink_after = shrink_after
        self._steady = 0  # steps since the buffers last changed
        self._graphed = False  # whether `_step` was made to replay a graph
        self._sparse = 0  # steps in a row with at most a quarter of the slots used

    @property
    def size(self) -> int:
        return len(self.slot_of)

    @property
    def bucket(self) -> int:
        """Rows of the cache: running rows and free slots."""
        return 0 if self.cache is None else self.cache.batch_size

    def _changed(self) -> None:
        """The buffers are other tensors now: the step (and its graph) must be made again."""
        self._step, self._steady, self._graphed = None, 0, False

    def join(self, cache: TextKVCache, visual: VisualKV | None) -> None:
        """Append the rows of a prefilled `cache` (with `visual`, or None when it has no images)."""
        if self.cache is None:
            self._changed()
            self.cache, self.visual, self.slot_of = cache, visual, list(range(cache.batch_size))
            return
        if self.slots and visual is None and self.visual is None and cache.batch_size == 1:
            self._place(cache)
            return
        self._compact(self.size)
        self.visual = stack_visual(self.visual, self.cache.batch_size, visual, cache.batch_size)
        self.cache = TextKVCache.concat([self.cache, cache])
        self.slot_of = list(range(self.cache.batch_size))
        self._changed()

    def _place(self, cache: TextKVCache) -> None:
        """Copy a one-row cache into a free slot (growing the bucket when there is none)."""
        assert self.cache is not None
        if self.size == self.bucket:
            self._compact(1 << self.size.bit_length())  # the next power of two
        if cache.length > self.cache.length:  # make room before the write index for the longer row
            extra = cache.length - self.cache.length
            if self.cache.length + extra > self.cache.capacity:
                self.cache.reserve(extra)
                self._changed()
            self.cache.shift(extra)
        slot = min(set(range(self.bucket)) - set(self.slot_of))
        self.cache.place(slot, cache)
        self.slot_of.append(slot)

    def _compact(self, bucket: int) -> None:
        """Rewrite the cache (and visual K/V) with the running rows first, in row order, then free slots
        up to `bucket` rows; new buffers."""
        assert self.cache is not None
        if self.slot_of != list(range(self.bucket)) or bucket != self.bucket:
            self.cache.select(self.slot_of)
            if self.visual is not None:
                self.visual = self.visual.select(self.slot_of)
            if bucket > self.size:
                self.cache = TextKVCache.concat([self.cache, self.model.new_cache(bucket - self.size, 0)])
            self.slot_of = list(range(self.size))
            self._changed()

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current rows, in order)."""
        if self.cache is None or rows == list(range(self.size)):
            return
        self.slot_of = [self.slot_of[i] for i in rows]
        if not rows:
            self.cache = self.visual = None
            self._changed()
            return
        if self.slots and self.visual is None:
            free = sorted(set(range(self.bucket)) - set(self.slot_of))
            self.cache.valid[free] = False
            self._drop_unused_columns()
            return
        self._compact(self.size)
        if self.visual is not None and not bool(self.visual.num_images.any()):
            self.visual = None
            self._changed()

    def _drop_unused_columns(self) -> None:
        """Drop, in place, the leading columns no running row uses once they are half the capacity."""
        assert self.cache is not None
        used = self.cache.valid[self.slot_of, : self.cache.length].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.cache.length
        if 2 * start >= self.cache.capacity:
            self.cache.shift(-start)

    def step(self, tokens: torch.Tensor, room: int | None = None) -> torch.Tensor:
        """Feed one token per row (`[B]`) and return the next-token logits `[B, vocab]`. `room`: the most
        tokens any row may still take, this one included; without it the step is never graphed (a graph
        cannot grow the cache)."""
        if self.cache is None:
            raise RuntimeError("step() on an empty batch")
        device = self.model.device
        self._sparse = self._sparse + 1 if 4 * self.size <= self.bucket else 0
        if self._sparse > self.shrink_after:  # the smallest power of two that holds the rows
            self._compact(1 << (self.size - 1).bit_length())
            self._sparse = 0
        if self._graphed and room is not None and self.cache.length + room > self.cache.capacity:
            self.cache.reserve(room)  # a row that joined needs more room than the graph's cache has
            self._changed()
        if self._step is None:
            self._step = DecodeStep(self.model, self.cache, self.visual)
        elif self.graphs and room is not None and not self._graphed and self._steady >= self.graph_after:
            self.cache.reserve(room)
            self._step, self._graphed = DecodeStep(self.model, self.cache, self.visual, graph=True), True
        self._steady += 1
        compact = self.slot_of == list(range(self.bucket))
        slots = None if compact else torch.tensor(self.slot_of, device=device)
        fed = tokens.to(device)
        if slots is not None:  # free slots decode token 0, which nobody reads
            fed = torch.zeros(self.bucket, dtype=tokens.dtype, device=device).index_copy_(0, slots, fed)
        logits = self._step(fed)
        return logits if slots is None else logits.index_select(0, slots)
