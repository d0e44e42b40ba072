"""Guided training on synthetic video questions: targets for the frame tokens and for three attention heads.

"What appeared after the red cross?" needs a chain of look-ups that answer tokens alone did not teach the
small default model (docs/train.md). A recipe's `video_guidance` adds, for each synthetic video sample:

- `captions`: the token that sees frame k at MI-Rope distance 0 (the one right after frame k's
  `<|image|>`) is trained to say frame k's colour or its shape (drawn per frame), or `no` when the frame
  is empty;
- `previous_shape: [layer, head]`: from that token (non-empty frames), that head attends to the token of
  the last frame of the shape shown before;
- `question_shape: [layer, head]`: from the two positions that predict the answer's two words, that head
  attends to the question's words for X (" red", " cross");
- `answer_frames: [layer, head]`: from the same two positions, that head attends to the tokens of the
  answer's frames.

The last two apply to "after X" questions only. Each attention target adds `weight * -log(attention mass on
the target keys)` to the summed token loss. All of it is training only: the model, its checkpoint and the
prompt layout stay official. The trainer takes it through `bind_video_guidance`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyperowl.errors import RecipeError
from hyperowl.model.decoder import apply_rotary
from hyperowl.processing.processor import IGNORE_INDEX, Owl3Processor
from hyperowl.synthetic.draw import COLOURS, SHAPES
from hyperowl.synthetic.tasks import Sample

ROLES = ("previous_shape", "question_shape", "answer_frames")

#: Attention targets of one conversation: role -> [(query position, [key positions])].
Targets = dict[str, list[tuple[int, list[int]]]]


@dataclass(frozen=True)
class VideoFacts:
    """The ground truth of one synthetic video question at its sampled frames.

    `frame_events[k]`: the event shown in frame k (None: empty); `items[e]`: event e's (colour, shape);
    `answer_event`; `named_event`: the event an "after X" question names (None for first / last);
    `caption_colour[k]`: frame k's caption is its colour (else its shape).
    """

    frame_events: list[int | None]
    items: list[tuple[str, str]]
    answer_event: int
    named_event: int | None
    caption_colour: list[bool]


def video_facts(sample: Sample, times: Sequence[float], seed: int) -> VideoFacts | None:
    """Facts of a one-video sample whose answer names a shape (None otherwise, e.g. a lettered choice)."""
    if len(sample.videos) != 1:
        return None
    video = sample.videos[0]
    names = [event.item.name for event in video.events]
    if sample.answer not in names:
        return None
    rng = random.Random(f"captions:{seed}")
    return VideoFacts(
        frame_events=[video.event_at(t) for t in times],
        items=[(event.item.colour, event.item.shape) for event in video.events],
        answer_event=names.index(sample.answer),
        named_event=names.index(sample.named) if sample.named in names else None,
        caption_colour=[rng.random() < 0.5 for _ in times],
    )


@dataclass(frozen=True)
class VideoGuidance:
    """A recipe's `video_guidance`: `captions`, the heads `role -> (layer, head)` and the loss `weight`."""

    captions: bool
    heads: dict[str, tuple[int, int]]
    weight: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoGuidance:
        unknown = sorted(set(data) - {"captions", "weight", *ROLES})
        if unknown:
            raise RecipeError(f"unknown video_guidance keys: {', '.join(unknown)}; expected captions, weight, {', '.join(ROLES)}")
        heads = {}
        for role in ROLES:
            if role in data:
                pair = data[role]
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and v >= 0 for v in pair)):
                    raise RecipeError(f"video_guidance.{role} must be [layer, head] (0-based); got {pair!r}")
                heads[role] = (pair[0], pair[1])
        weight = float(data.get("weight", 1.0))
        if weight <= 0:
            raise RecipeError(f"video_guidance.weight must be > 0; got {weight}")
        return cls(bool(data.get("captions", False)), heads, weight)

    def check(self, num_layers: int, num_heads: int) -> None:
        """Raise RecipeError if a head is outside a model with these sizes."""
        for role, (layer, head) in self.heads.items():
            if layer >= num_layers or head >= num_heads:
                raise RecipeError(
                    f"video_guidance.{role} = [{layer}, {head}] is outside the model ({num_layers} layers, {num_heads} heads)"
                )


class GuideTokens:
    """Token ids the guidance needs, each checked to be one token of `tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        def one(text: str) -> int:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise RecipeError(f"video_guidance needs {text!r} to be one token; this tokenizer splits it into {len(ids)}")
            return ids[0]

        # Captions use the forms that start and continue an answer ("red" then " circle").
        self.caption_colour = {c: one(c) for c in COLOURS}
        self.caption_shape = {s: one(" " + s) for s in SHAPES}
        self.empty = one("no")
        self.question_colour = {c: one(" " + c) for c in COLOURS}
        self.question_shape = self.caption_shape


class VideoGuide:
    """`VideoGuidance` bound to a processor's tokenizer: builds each conversation's targets."""

    def __init__(self, config: VideoGuidance, tokenizer: Any, image_token_id: int) -> None:
        self.config = config
        self.tokens = GuideTokens(tokenizer)
        self.image_token_id = image_token_id

    def add_targets(self, input_ids: torch.Tensor, labels: torch.Tensor, facts: VideoFacts) -> Targets:
        """Write the caption labels into `labels` `[T]` (in place) and return the attention targets.

        Frame k's `<|image|>` sits at `image_pos[k]`; the token after it sees frame k at MI-Rope distance 0.
        """
        image_pos = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        if len(image_pos) != len(facts.frame_events):
            raise ValueError(f"{len(image_pos)} image tokens for {len(facts.frame_events)} frames")
        seen = [p + 1 for p in image_pos]
        answer = next(i for i in (labels != IGNORE_INDEX).nonzero().flatten().tolist() if i > image_pos[-1])
        targets: Targets = {role: [] for role in self.config.heads}
        if "previous_shape" in targets:
            for k, event in enumerate(facts.frame_events):
                before = [j for j in range(k) if facts.frame_events[j] not in (None, event)]
                if event is not None and before:
                    targets["previous_shape"].append((seen[k], [seen[before[-1]]]))
        if facts.named_event is not None:
            asking = [answer - 1, answer]
            # an event that no sampled frame shows (few frames) or words not found give no target
            if "answer_frames" in targets:
                keys = [seen[k] for k, event in enumerate(facts.frame_events) if event == facts.answer_event]
                targets["answer_frames"] = [(q, keys) for q in asking] if keys else []
            if "question_shape" in targets:
                colour, shape = facts.items[facts.named_event]
                words = {self.tokens.question_colour[colour], self.tokens.question_shape[shape]}
                keys = [i for i in range(image_pos[-1] + 1, answer) if int(input_ids[i]) in words]
                targets["question_shape"] = [(q, keys) for q in asking] if keys else []
        if self.config.captions:
            for k, event in enumerate(facts.frame_events):
                if event is None:
                    caption = self.tokens.empty
                else:
                    colour, shape = facts.items[event]
                    caption = self.tokens.caption_colour[colour] if facts.caption_colour[k] else self.tokens.caption_shape[shape]
                # labels[t] is predicted at t - 1: the token at seen[k] predicts labels[seen[k] + 1]
                labels[seen[k] + 1] = caption
        return targets


def collate_targets(targets: Sequence[Targets | None], lengths: Sequence[int], length: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per-conversation targets of a left-padded batch (row r padded by `length - lengths[r]`) ->
    role -> (rows `[N]`, query positions `[N]`, key mask `[N, length]`)."""
    out = {}
    roles = sorted({role for t in targets if t for role in t})
    for role in roles:
        rows, queries, masks = [], [], []
        for row, (t, n) in enumerate(zip(targets, lengths)):
            pad = length - n
            for query, keys in (t or {}).get(role, []):
                mask = torch.zeros(length, dtype=torch.bool)
                mask[[pad + k for k in keys]] = True
                rows.append(row)
                queries.append(pad + query)
                masks.append(mask)
        out[role] = (
            torch.tensor(rows, dtype=torch.long),
            torch.tensor(queries, dtype=torch.long),
            torch.stack(masks) if masks else torch.zeros((0, length), dtype=torch.bool),
        )
    return out


def _head_projection(linear: nn.Linear, x: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    """Head `head`'s `[..., head_dim]` slice of `linear(x)`, computed from that slice of the weights alone."""
    part = slice(head * head_dim, (head + 1) * head_dim)
    return F.linear(x, linear.weight[part], None if linear.bias is None else linear.bias[part])


def target_attention_loss(
    attn: nn.Module, x: torch.Tensor, ctx: Any, head: int, rows: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Sum over targets of `-log` (attention mass of `head` of `attn` at query `(rows, queries)` on the
    `keys` `[N, T]` mask), recomputed from the layer's normed input `x` `[B, T, H]` and its step context.
    Only that head's query at the query positions and its kv head's keys are projected."""
    d = attn.head_dim
    cos, sin = ctx.cos[:, 0], ctx.sin[:, 0]  # [B, T, d]
    q = apply_rotary(_head_projection(attn.q_proj, x[rows, queries], head, d), cos[rows, queries], sin[rows, queries])
    k = apply_rotary(_head_projection(attn.k_proj, x, head // (attn.num_heads // attn.num_kv_heads), d), cos, sin)
    scores = torch.einsum("nd,nkd->nk", q.float(), k[rows].float()) / math.sqrt(d)
    log_probs = scores.masked_fill(~ctx.self_mask[rows, 0, queries], float("-inf")).log_softmax(-1)
    return -log_probs.masked_fill(~keys, float("-inf")).logsumexp(-1).sum()


class AttentionGuide:
    """Forward hooks on the guided heads' attention modules that sum `target_attention_loss` while
    `targets` (from `collate_targets`, on the model's device) are set; `loss` holds the weighted sum."""

    def __init__(self, model: nn.Module, guide: VideoGuidance) -> None:
        self.weight = guide.weight
        self.targets: dict[str, tuple[torch.Tensor, ...]] = {}
        self.loss: torch.Tensor | float = 0.0
        layers = model.language_model.model.layers
        for role, (layer, head) in guide.heads.items():
            layers[layer].self_attn.register_forward_hook(self._hook(role, head))

    def _hook(self, role: str, head: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if role not in self.targets or self.targets[role][0].numel() == 0:
                return
            x, ctx = args
            self.loss = self.loss + self.weight * target_attention_loss(module, x, ctx, head, *self.targets[role])

        return hook


def bind_video_guidance(
    spec: dict[str, Any], model: nn.Module, processor: Owl3Processor
) -> tuple[VideoGuide, AttentionGuide | None]:
    """A recipe's `video_guidance` dict bound to `model` and its `processor`: the builder of each sample's
    targets (for the data) and the hooks adding the attention-target loss (None when no head is guided).
    Raises `RecipeError` for a bad dict or a head outside the model."""
    guidance = VideoGuidance.from_dict(spec)
    guidance.check(model.config.num_hidden_layers, model.config.num_attention_heads)
    targets = VideoGuide(guidance, processor.tokenizer, processor.image_token_id)
    return targets, AttentionGuide(model, guidance) if guidance.heads else None
