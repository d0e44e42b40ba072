"""Continuous batching: requests prefilled one by one (`hyperowl.engine.generate.prefill`) join a running decode batch and leave it when done.

A `DecodeBatch` holds one text KV cache and one `VisualKV` for all running rows. A row without
images gets an empty visual row (`num_images = 0`), which the model treats as "sees no image"; when
no running row has an image left, the batch drops its visual K/V altogether.

On a GPU, once the batch's decode step has stayed the same for `graph_after` steps, the batch reserves
the room its rows may still need and replays the step from a CUDA graph (`DecodeStep`). The step stays
the same while the buffers do and while its cross-attention plan (how many images it reads per row,
and whether every row has that many: the unmasked, flash path) still holds.

Rows live in slots (on a GPU): the caches have a power-of-two number of rows (the batch-size bucket), a
row that leaves frees its slot and a row that joins is copied into a free one, in place, so the bucket's
graph stays valid across joins and leaves (free slots decode a dummy token that nobody reads, over the
images their last row left). New buffers, and so a new capture, come only when the bucket grows (when
full) or shrinks (after `shrink_after` steps with at most a quarter of it used), when a joining prompt
is longer than the write index allows, when a row brings more images than a slot holds or the text
cache must grow. A new plan comes when a join breaks the old one (a row with another number of images
where all had the same) or lets every row have the same number again. Columns that no row uses any more
are dropped in place. A burst of arrivals does not pay a capture for every change: a changed step is
captured once it has settled again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hyperowl.engine.generate import DecodeStep
from hyperowl.model.cache import TextKVCache, VisualKV

if TYPE_CHECKING:
    from hyperowl.model.owl3 import Owl3Model


def blank_visual(like: VisualKV, rows: int, images: int = 0) -> VisualKV:
    """A `VisualKV` of `rows` rows shaped (layers, heads, dtype, device) like `like`, with zero K/V
    counted as `images` images each (0: rows without images; more: free slots that keep a batch whose
    rows all have that many images on one unmasked plan)."""
    width = images * like.tokens_per_image
    return VisualKV(
        [k.new_zeros(rows, k.shape[1], width, k.shape[3]) for k in like.keys],
        [v.new_zeros(rows, v.shape[1], width, v.shape[3]) for v in like.values],
        torch.full((rows,), images, dtype=torch.long, device=like.num_images.device),
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
            first if first is not None else blank_visual(like, first_rows),
            second if second is not None else blank_visual(like, second_rows),
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
        """`graph_after`: steps with an unchanged decode step before it is captured in a CUDA graph;
        `graphs`: whether to capture at all (None: when the model is on a CUDA device); `slots`: whether
        rows keep slots in a bucket (None: when graphs are captured); `shrink_after`: steps with at most
        a quarter of the slots used before the bucket shrinks to fit."""
        self.model = model
        self.cache: TextKVCache | None = None
        self.visual: VisualKV | None = None
        self.images: list[int] = []  # the images of each cache row (its slot), as `visual.num_images` has them
        self._step: DecodeStep | None = None  # over the current buffers and plan; rebuilt when they change
        self.graph_after = graph_after
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.slots = self.graphs if slots is None else slots
        self.shrink_after = shrink_after
        self.slot_of: list[int] = []  # the cache row of each running row, in row order
        self._steady = 0  # steps since the decode step was last made
        self._graphed = False  # whether `_step` was made to replay a graph
        self._sparse = 0  # steps in a row with at most a quarter of the slots used

    @property
    def size(self) -> int:
        return len(self.slot_of)

    @property
    def bucket(self) -> int:
        """Rows of the caches: running rows and free slots."""
        return 0 if self.cache is None else self.cache.batch_size

    def _changed(self) -> None:
        """The buffers or the plan changed: the step (and its graph) must be made again."""
        self._step, self._steady, self._graphed = None, 0, False

    def _counted(self) -> None:
        """Refresh the host copy of every cache row's images (one read back, when the rows were rebuilt)."""
        self.images = [] if self.visual is None else self.visual.num_images.tolist()

    def join(self, cache: TextKVCache, visual: VisualKV | None) -> None:
        """Append the rows of a prefilled `cache` (with `visual`, or None when it has no images)."""
        if self.cache is None:
            self._changed()
            self.cache, self.visual, self.slot_of = cache, visual, list(range(cache.batch_size))
            self._counted()
            return
        images = 0 if visual is None else int(visual.num_images.max())
        width = 0 if self.visual is None else self.visual.keys[0].shape[2] // self.visual.tokens_per_image
        if self.slots and cache.batch_size == 1 and (self.visual is not None or visual is None) and images <= width:
            self._place(cache, visual, images)
            return
        self._compact(self.size)
        self.visual = stack_visual(self.visual, self.cache.batch_size, visual, cache.batch_size)
        self.cache = TextKVCache.concat([self.cache, cache])
        self.slot_of = list(range(self.cache.batch_size))
        self._counted()
        self._changed()

    def _place(self, cache: TextKVCache, visual: VisualKV | None, images: int) -> None:
        """Copy a one-row request into a free slot (growing the bucket when there is none)."""
        assert self.cache is not None
        if self.size == self.bucket:
            self._compact(1 << self.size.bit_length(), images)  # the next power of two
        if cache.length > self.cache.length:  # make room before the write index for the longer row
            extra = cache.length - self.cache.length
            if self.cache.length + extra > self.cache.capacity:
                self.cache.reserve(extra)
                self._changed()
            self.cache.shift(extra)
        slot = min(set(range(self.bucket)) - set(self.slot_of))
        self.cache.place(slot, cache)
        if self.visual is not None:
            self.visual.place(slot, visual)
            self.images[slot] = images
            plan = None if self._step is None else self._step.cross
            if plan is not None:  # a decode plan is one block: the images it reads per row, whether all have them
                most, full = plan.blocks[0].num_images, plan.blocks[0].full
                if max(self.images) > most or full != (min(self.images) == most):
                    self._changed()  # the plan no longer holds, or all rows have the same images again
        self.slot_of.append(slot)

    def _compact(self, bucket: int, images: int = 0) -> None:
        """Rewrite the caches with the running rows first, in row order, then free slots up to `bucket`
        rows, counted with the most images of a running row or `images` (the row about to join), so that
        the slots hold that many; new buffers."""
        assert self.cache is not None
        if self.slot_of == list(range(self.bucket)) and bucket == self.bucket:
            return
        self.cache.select(self.slot_of)
        if self.visual is not None:
            self.visual = self.visual.select(self.slot_of)
        free = bucket - self.size
        if free > 0:
            self.cache = TextKVCache.concat([self.cache, self.model.new_cache(free, 0)])
            if self.visual is not None:
                most = max([images] + [self.images[slot] for slot in self.slot_of])
                self.visual = VisualKV.concat([self.visual, blank_visual(self.visual, free, most)])
        self.slot_of = list(range(self.size))
        self._counted()
        self._changed()

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current rows, in order)."""
        if self.cache is None or rows == list(range(self.size)):
            return
        self.slot_of = [self.slot_of[i] for i in rows]
        if not rows:
            self.cache = self.visual = None
            self.images = []
            self._changed()
            return
        if self.visual is not None and not any(self.images[slot] for slot in self.slot_of):
            self._compact(self.size)  # no running row has images left: decode without visual K/V
            self.visual, self.images = None, []
            self._changed()
            return
        if self.slots:  # freed slots keep their last row's images, so the plan still holds
            free = sorted(set(range(self.bucket)) - set(self.slot_of))
            self.cache.valid[free] = False
            self._drop_unused_columns()
            return
        self._compact(self.size)

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
