"""Evaluation requests (one model call each), circular option rotation and prompt building."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hyperowl.eval.data import EvalItem
from hyperowl.processing.choices import format_question
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN


@dataclass
class EvalRequest:
    """One prompt sent to the model.

    Attributes:
        id: unique request id (the key of resumable result files).
        group: scoring unit; a group counts as right only when all its requests are right
            (circular evaluation: one group per question; distractor test: one per question and level).
        item: the question as shown: its options in the order shown, ``answer`` the index in that
            order, ``images`` those shown (a distractor prompt adds other questions' images).
        level: number of images shown (distractor test), else None.
        variant: 0 for the published option order / first variant, 1, 2, ... for the others.
    """

    id: str
    group: str
    item: EvalItem
    level: int | None = None
    variant: int = 0


def rotate_options(options: Sequence[str], answer: int, shift: int) -> tuple[list[str], int]:
    """Options moved ``shift`` places to the left (option ``shift`` first) and the answer's new index."""
    count = len(options)
    if count == 0:
        raise ValueError("cannot rotate an empty option list")
    shift %= count
    return list(options[shift:]) + list(options[:shift]), (answer - shift) % count


def item_request(item: EvalItem, shift: int = 0, request_id: str | None = None, group: str | None = None) -> EvalRequest:
    """A request for ``item`` with its options rotated by ``shift``."""
    options, answer = list(item.options), item.answer
    if options and shift:
        options, answer = rotate_options(options, int(answer), shift)
    shown = replace(item, options=options, answer=answer)
    return EvalRequest(id=request_id or item.id, group=group or item.id, item=shown, variant=shift)


def build_requests(items: Sequence[EvalItem], circular: bool) -> list[EvalRequest]:
    """Requests for benchmark items: with ``circular``, one per option rotation (ids ``{id}#r{k}``,
    all in group ``{id}``), else one per item with the published option order."""
    requests = []
    for item in items:
        if circular and len(item.options) > 1:
            requests += [item_request(item, k, f"{item.id}#r{k}") for k in range(len(item.options))]
        else:
            requests.append(item_request(item))
    return requests


def build_messages(request: EvalRequest) -> list[dict[str, Any]]:
    """The one-turn conversation for a request: media placeholders first (unless the question
    already places its ``<|image|>`` tokens), then the question, hint and lettered options."""
    text = format_question(request.item.question, request.item.options, request.item.hint)
    missing_images = len(request.item.images) - text.count(IMAGE_TOKEN)
    prefix = IMAGE_TOKEN * max(0, missing_images) + (VIDEO_TOKEN if request.item.video else "")
    return [{"role": "user", "content": f"{prefix}\n{text}" if prefix else text}]
