"""Caches for generation: the text KV cache and the per-request visual K/V of the hyper layers.

Rows of a batch share one write index (`TextKVCache.length`); a row whose history is shorter is
left-padded and its padding is masked by `valid`. This keeps every decode step a plain slice write,
lets a new request join a running batch (`TextKVCache.concat`) and a finished one leave
(`select`), which is what continuous batching needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class TextKVCache:
    """Keys/values of every decoder layer, `[batch, kv_heads, capacity, head_dim]` each.

    `valid[b, j]` says whether slot `j` of row `b` holds a real token; `positions[b]` is the rotary
    position the next token of row `b` gets.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reserve(self, new_tokens: int) -> None:
        """Grow the buffers (doubling) so that `new_tokens` more columns fit."""
        need = self.length + new_tokens
        if need <= self.capacity:
            return
        extra = max(need, 2 * self.capacity) - self.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)
        self.keys = [pad(k) for k in self.keys]
        self.values = [pad(v) for v in self.values]
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch_size, extra)], dim=1)

    def begin_step(self, attention_mask: torch.Tensor) -> None:
        """Mark the next `attention_mask.shape[1]` columns (`[batch, new]`, 1 = real token) before a forward."""
        new = attention_mask.shape[1]
        self.reserve(new)
        self.valid[:, self.length : self.length + new] = attention_mask.bool()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` `[batch, kv_heads, new, head_dim]` of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` `[batch, kv_heads, 1, head_dim]` of `layer` at column `index` (`[1]` long, on the
        cache's device, so the write needs no host value); return the whole buffers `[batch, kv_heads,
        capacity, head_dim]` (columns not marked `valid` must be masked by the caller)."""
        self.keys[layer].index_copy_(2, index, k)
        self.values[layer].index_copy_(2, index, v)
        return self.keys[layer], self.values[layer]

    def advance(self) -> None:
        """After a decode step at column `length` (`Owl3Model.decode`): the next goes one column and one
        position further."""
        self.length += 1
        self.positions += 1

    def end_step(self, attention_mask: torch.Tensor) -> None:
        """Advance the write index and the per-row positions after a forward of `attention_mask` columns."""
        self.length += attention_mask.shape[1]
        self.positions += attention_mask.sum(dim=1)

    def truncate(self, length: int) -> None:
        """Forget every column from `length` on (used to reuse a shared prefix between chat turns)."""
        self.positions -= self.valid[:, length : self.length].sum(dim=1)
        self.valid[:, length:] = False
        self.length = min(self.length, length)

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only `rows`, then drop leading columns that no kept row uses."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]
        self.positions = self.positions[rows]
        used = self.valid[:, : self.length].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        if start:
            self.keys = [k[:, :, start:] for k in self.keys]
            self.values = [v[:, :, start:] for v in self.values]
            self.valid = self.valid[:, start:]
            self.length -= start

    def place(self, row: int, other: TextKVCache) -> None:
        """Overwrite row `row` with the one row of `other`, right-aligned at this cache's write index, in
        place (the buffers stay the same tensors). `other.length` must not exceed `length`."""
        if other.length > self.length:
            raise ValueError(f"a row of {other.length} columns does not fit before column {self.length}")
        start = self.length - other.length
        for mine, theirs in zip([*self.keys, *self.values], [*other.keys, *other.values]):
            mine[row, :, start : self.length].copy_(theirs[0, :, : other.length])
        self.valid[row].fill_(False)
        self.valid[row, start : self.length].copy_(other.valid[0, : other.length])
        self.positions[row] = other.positions[0]

    def shift(self, columns: int) -> None:
        """Move every row's columns by `columns` in place (the buffers stay the same tensors): right when
        positive (room must be reserved), left when negative (the first `-columns` columns are dropped)."""
        if columns == 0:
            return
        if self.length + columns > self.capacity or self.length + columns < 0:
            raise ValueError(f"cannot shift {self.length} columns by {columns} in a capacity of {self.capacity}")
        src, dst = (slice(0, self.length), slice(columns, self.length + columns)) if columns > 0 else (
            slice(-columns, self.length), slice(0, self.length + columns))  # fmt: skip
        for t in [*self.keys, *self.values]:
            t[:, :, dst] = t[:, :, src].clone()
        self.valid[:, dst] = self.valid[:, src].clone()
        if columns > 0:
            self.valid[:, :columns] = False
        else:
            self.valid[:, self.length + columns : self.length] = False
        self.length += columns

    @staticmethod
    def concat(caches: list[TextKVCache]) -> TextKVCache:
        """One cache holding the rows of all `caches`, right-aligned at a common write index."""
        length = max(c.length for c in caches)
        first = caches[0]
        out = TextKVCache.__new__(TextKVCache)

        def aligned(t: torch.Tensor, c: TextKVCache) -> torch.Tensor:
            t = t[..., : c.length] if t.dim() == 2 else t[:, :, : c.length]
            shift = length - c.length
            if t.dim() == 2:
                return torch.cat([t.new_zeros(t.shape[0], shift), t], dim=1)
            return torch.cat([t.new_zeros(*t.shape[:2], shift, t.shape[3]), t], dim=2)

        out.keys = [torch.cat([aligned(c.keys[i], c) for c in caches]) for i in range(len(first.keys))]
        out.values = [torch.cat([aligned(c.values[i], c) for c in caches]) for i in range(len(first.values))]
        out.valid = torch.cat([aligned(c.valid, c) for c in caches])
        out.positions = torch.cat([c.positions for c in caches])
        out.length = length
        return out


@dataclass
class VisualKV:
    """Visual keys/values of every hyper layer, computed once per request and reused for every token.

    `keys[i]`/`values[i]`: `[batch, kv_heads, max_images * tokens_per_image, head_dim]` for the i-th
    hyper layer (in layer order), MI-Rope already applied to the keys. Rows with fewer images are
    zero-padded; `num_images[b]` says how many images row `b` has.

    The tensors may be stored in a lower precision than the model computes in (e.g. fp8 or bf16
    for an fp32 model) and/or on the CPU in pinned memory while the model runs on a GPU;
    `layer(i, n, device, dtype)` returns them ready for use (cast and moved at use). `num_images`
    always lives on the compute device.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_images: torch.Tensor
    tokens_per_image: int

    @staticmethod
    def allocate(
        num_layers: int,
        num_images: list[int],
        tokens_per_image: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        compute_device: torch.device | str,
        pin_memory: bool = False,
    ) -> VisualKV:
        """Zero-filled storage for rows of `num_images[b]` images each (`[B, g, max_images * P, d]` per
        layer), filled image by image with `write`. `pin_memory` pins CPU storage for fast copies."""
        shape = (len(num_images), kv_heads, max(num_images, default=0) * tokens_per_image, head_dim)

        def zeros() -> torch.Tensor:
            t = torch.zeros(shape, dtype=dtype, device=device)
            return t.pin_memory() if pin_memory else t

        return VisualKV(
            [zeros() for _ in range(num_layers)],
            [zeros() for _ in range(num_layers)],
            torch.tensor(num_images, dtype=torch.long, device=compute_device),
            tokens_per_image,
        )

    def write(self, layer: int, row: int, first_image: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `keys`/`values` `[n, kv_heads, tokens_per_image, head_dim]` of images `first_image ..
        first_image + n - 1` of `row` in hyper layer `layer` (cast to the storage dtype/device)."""
        n, g, p, d = keys.shape
        cols = slice(first_image * p, (first_image + n) * p)
        for store, src in ((self.keys[layer], keys), (self.values[layer], values)):
            store[row, :, cols].copy_(src.transpose(0, 1).reshape(g, n * p, d), non_blocking=True)

    def layer(
        self, index: int, num_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values `[B, g, num_tokens, d]` (the first `num_tokens` visual tokens) of hyper layer
        `index` on `device` in `dtype`; views without a copy when already stored that way."""
        return tuple(  # type: ignore[return-value]
            t[:, :, :num_tokens].to(device=device, dtype=dtype, non_blocking=True)
            for t in (self.keys[index], self.values[index])
        )

    @property
    def batch_size(self) -> int:
        return self.num_images.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def place(self, row: int, other: VisualKV | None) -> None:
        """Overwrite row `row` with the one row of `other` (None: a row without images), in place (the
        buffers stay the same tensors). `other`'s images must fit in this row's width."""
        width = 0 if other is None else other.keys[0].shape[2]
        if width > self.keys[0].shape[2]:
            raise ValueError(f"a row of {width} visual tokens does not fit in {self.keys[0].shape[2]}")
        if other is not None:
            for mine, theirs in zip([*self.keys, *self.values], [*other.keys, *other.values]):
                mine[row, :, :width].copy_(theirs[0], non_blocking=True)
            self.num_images[row] = other.num_images[0]
        else:
            self.num_images[row] = 0

    def select(self, rows: torch.Tensor | list[int]) -> VisualKV:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.num_images.device)
        keep = int(self.num_images[rows].max()) * self.tokens_per_image if len(rows) else 0
        return VisualKV(
            [k[rows, :, :keep] for k in self.keys],
            [v[rows, :, :keep] for v in self.values],
            self.num_images[rows],
            self.tokens_per_image,
        )

    @staticmethod
    def concat(parts: list[VisualKV]) -> VisualKV:
        """Stack the rows of `parts` (each with its own images), zero-padding to the longest."""
        longest = max(p.keys[0].shape[2] for p in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], longest - t.shape[2], t.shape[3])], dim=2)

        return VisualKV(
            [torch.cat([pad(p.keys[i]) for p in parts]) for i in range(len(parts[0].keys))],
            [torch.cat([pad(p.values[i]) for p in parts]) for i in range(len(parts[0].values))],
            torch.cat([p.num_images for p in parts]),
            parts[0].tokens_per_image,
        )

    def extend(self, more: VisualKV) -> VisualKV:
        """Append `more`'s images after this one's, row by row (new images of a later chat turn)."""
        keys, values = [], []
        for mine, theirs, out in ((self.keys, more.keys, keys), (self.values, more.values, values)):
            for a, b in zip(mine, theirs):
                rows = []
                for r in range(self.batch_size):
                    na = int(self.num_images[r]) * self.tokens_per_image
                    nb = int(more.num_images[r]) * self.tokens_per_image
                    rows.append(torch.cat([a[r, :, :na], b[r, :, :nb]], dim=1))
                longest = max(x.shape[1] for x in rows)
                out.append(torch.stack([torch.cat([x, x.new_zeros(x.shape[0], longest - x.shape[1], x.shape[2])], 1) for x in rows]))
        return VisualKV(keys, values, self.num_images + more.num_images, self.tokens_per_image)
