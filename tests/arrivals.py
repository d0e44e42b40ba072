"""Greedy continuous batching of requests that arrive over time, for the `DecodeBatch` tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hyperowl.engine.batching import DecodeBatch
from hyperowl.engine.generate import prefill

#: A request: its model inputs (as `prefill` takes them), the step it arrives at, how many tokens it takes.
Request = tuple[dict[str, Any], int, int]


@torch.no_grad()
def decode_arrivals(
    batch: DecodeBatch, requests: list[Request], steps: int, on_step: Callable[[DecodeBatch], None] | None = None
) -> list[list[int]]:
    """Each request is prefilled at its step, joins `batch` and leaves once it has its tokens (the first
    from its prefill, the others from decode steps, greedy); `on_step(batch)` runs after every decode
    step. Returns every request's tokens, in request order (an empty list for one that did not finish)."""
    rows: list[tuple[int, list[int]]] = []
    got: dict[int, list[int]] = {}
    for step in range(steps):
        for index, (inputs, at, _) in enumerate(requests):
            if at == step:
                logits, cache, visual = prefill(batch.model, **inputs)
                batch.join(cache, visual)
                rows.append((index, [int(logits[0].argmax())]))
        if rows:
            room = max(requests[index][2] - len(ids) for index, ids in rows)
            logits = batch.step(torch.tensor([ids[-1] for _, ids in rows]), room=room)
            for (_, ids), token in zip(rows, logits.argmax(-1).tolist()):
                ids.append(token)
            if on_step is not None:
                on_step(batch)
        keep = [i for i, (index, ids) in enumerate(rows) if len(ids) < requests[index][2]]
        got.update({index: ids for index, ids in rows if len(ids) >= requests[index][2]})
        rows = [rows[i] for i in keep]
        batch.keep(keep)
    return [got.get(i, []) for i in range(len(requests))]
