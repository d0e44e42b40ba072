"""The token-concatenation baseline (transformers' LLaVA checkpoints) behind the interface the runner uses.

A LLaVA model inserts every visual token into the LLM sequence; the prompt layout is otherwise the
one `Owl3Processor` makes, with each `<|image|>` placeholder repeated once per visual token. The
baseline of this project is trained by `benchmarks/train_baseline.py` on the same synthetic recipe as
the bundled model, so `hyperowl eval run --model <that folder>` scores both designs the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hyperowl.engine.generate import GenerationOutput
from hyperowl.errors import CheckpointError

#: `model_type` of the checkpoints this module loads.
LLAVA_MODEL_TYPE = "llava"


def is_llava_checkpoint(path: str | Path) -> bool:
    """Whether `path/config.json` describes a transformers LLaVA model."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == LLAVA_MODEL_TYPE
    except (OSError, ValueError):
        return False


def _left_pad(rows: list[torch.Tensor], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(r.shape[0] for r in rows)), fill, dtype=rows[0].dtype, device=rows[0].device)
    for b, row in enumerate(rows):
        out[b, out.shape[1] - row.shape[0] :] = row
    return out


def expand_image_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Repeat every `image_token_id` of a left-padded batch `tokens_per_image` times (one slot per visual token).

    `input_ids`, `attention_mask`, `labels` `[B, T]` -> the same `[B, T']`, left-padded again with
    `pad_id` / 0 / -100 (the placeholders' labels are -100 already: they are in user turns).
    """
    if tokens_per_image == 1:
        return input_ids, attention_mask, labels
    repeats = torch.where(input_ids == image_token_id, tokens_per_image, 1) * (attention_mask > 0)
    ids = [row.repeat_interleave(r) for row, r in zip(input_ids, repeats)]
    mask = _left_pad([torch.ones_like(row) for row in ids], 0)
    new_labels = None if labels is None else _left_pad([row.repeat_interleave(r) for row, r in zip(labels, repeats)], -100)
    return _left_pad(ids, pad_id), mask.to(attention_mask.dtype), new_labels


class LlavaBaseline:
    """A transformers `LlavaForConditionalGeneration` checkpoint answering `Owl3Processor` batches.

    `generate(input_ids, attention_mask, pixel_values, ...)` returns a `GenerationOutput` like
    `Owl3ForCausalLM.generate` (greedy; `media_offset` and `vision_chunk_size` are not needed).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        from transformers import LlavaForConditionalGeneration

        try:
            self.model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the LLaVA checkpoint {path}: {exc}") from exc
        self.model.to(device).eval()
        config = self.model.config
        vision = config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.image_token_id = config.image_token_id
        self.pad_token_id = config.text_config.pad_token_id or 0

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def eval(self) -> LlavaBaseline:
        self.model.eval()
        return self

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        stop_token_ids: list[int] | None = None,
        **_: Any,
    ) -> GenerationOutput:
        """Greedy answers to a left-padded batch `[B, T]`; `pixel_values` `[N, 3, S, S]` in prompt order."""
        began = time.perf_counter()
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ids, mask, _ = expand_image_tokens(input_ids, mask, None, self.image_token_id, self.tokens_per_image, self.pad_token_id)
        stops = list(stop_token_ids or [])
        pictures = {} if pixel_values is None else {"pixel_values": pixel_values.to(self.device, self.dtype)}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            **pictures,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops or None,
            pad_token_id=self.pad_token_id,
        )
        new = out[:, ids.shape[1] :]
        counts = []
        for row in new.tolist():
            stop = next((i for i, token in enumerate(row) if token in stops), None)
            counts.append(len(row) if stop is None else stop + 1)
        total = time.perf_counter() - began
        return GenerationOutput(new, counts, int(ids.shape[1]), total, total)
