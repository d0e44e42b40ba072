"""The token-concatenation baseline: transformers' LLaVA design, built, trained, loaded and answering here.

A LLaVA model inserts every visual token into the LLM sequence (LLaVA-Next-Interleave design: SigLIP
features from `hidden_states[-2]`, all patches -> a 2-layer MLP projector -> one LLM position per
visual token). The prompt layout is otherwise the one `Owl3Processor` makes, with each `<|image|>`
placeholder repeated once per visual token.

- `build_baseline(owl, image_token_id)`: the baseline sharing an mPLUG-Owl3 model's vision tower and
  LLM tensors (the long-input benchmarks compare the two designs on the same weights).
- `train_baseline(cfg, out)`: trained on the same from-scratch synthetic recipe as an mPLUG-Owl3 model
  (same sizes, tokenizer, initial weights, data order, optimizer, schedule and steps); only the hyper
  layers' cross-attention modules are missing, and with them the recipe's `recency_prior` (an
  initialisation of those modules). Writes a transformers checkpoint + tokenizer.
- `LlavaBaseline(path)`: such a checkpoint answering `Owl3Processor` batches like
  `Owl3ForCausalLM.generate`, so `hyperowl eval run --model DIR` scores both designs the same way.

transformers is imported only when a baseline is built or loaded, the trainer only when one is trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hyperowl.engine.generate import GenerationOutput, Owl3ForCausalLM
from hyperowl.errors import CheckpointError
from hyperowl.processing.processor import IGNORE_INDEX, left_pad
from hyperowl.train.config import RecipeError, TrainConfig

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

#: `model_type` of the checkpoints this module loads.
LLAVA_MODEL_TYPE = "llava"


@contextmanager
def default_dtype_device(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Modules built inside the block get parameters of `dtype` on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_baseline(owl: Owl3ForCausalLM, image_token_id: int) -> LlavaForConditionalGeneration:
    """The LLaVA design from transformers' classes with visual tokens inserted at `image_token_id`.

    The projector is new (N(0, 0.02), frozen); the vision tower, the LLM and its head share their
    tensors with `owl` (no copy). Returned in eval mode.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    c, v = owl.config, owl.config.vision_config
    config = LlavaConfig(
        vision_config=v.to_transformers(vision_use_head=False),
        text_config=c.to_transformers(tie_word_embeddings=False),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    with default_dtype_device(owl.dtype, torch.device("meta")):
        llava = LlavaForConditionalGeneration(config)
    ours = dict(owl.named_parameters())
    for name, param in list(llava.named_parameters()):
        mapped = (
            name.replace("model.vision_tower.", "vision_model.")
            .replace("model.language_model.", "language_model.model.")
            .replace("lm_head.", "language_model.lm_head.")
        )
        module_name, leaf = name.rsplit(".", 1)
        module = llava.get_submodule(module_name)
        if mapped in ours:
            module._parameters[leaf] = ours[mapped]
        else:
            fresh = torch.empty(param.shape, dtype=owl.dtype, device=owl.device).normal_(0, 0.02)
            module._parameters[leaf] = nn.Parameter(fresh, requires_grad=False)
    rotary = llava.model.language_model.rotary_emb
    with owl.device:
        llava.model.language_model.rotary_emb = type(rotary)(config.text_config)
    embeddings = llava.model.vision_tower.embeddings
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=owl.device)[None]
    return llava.eval()


def pooled_logits(llava: LlavaForConditionalGeneration, frames: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Next-token logits `[vocab]` of the pooled token-concatenation design (LLaVA-Video /
    LLaVA-OneVision) for the prompt `before` (ids `[1, a]`), the frames `[n, 3, S, S]`, `after` (`[1, b]`).

    Every frame's tower features (hidden_states[-2]) go through the projector of `llava`
    (`build_baseline`: the same tower, LLM and head as hyperowl), are pooled 2x2 (bilinear, a 27x27 grid
    -> 14x14 = 196 tokens per 384-pixel frame, as LLaVA-OneVision's video pooling does) and are placed in
    the Qwen2 sequence between the two texts.
    """
    import math

    tower, projector = llava.model.vision_tower, llava.model.multi_modal_projector
    language = llava.model.language_model
    device = llava.lm_head.weight.device
    features = projector(tower(frames.to(device, non_blocking=True), output_hidden_states=True).hidden_states[-2])
    n, p, hidden = features.shape
    side = math.isqrt(p)
    grid = features.transpose(1, 2).reshape(n, hidden, side, side)
    pooled = torch.nn.functional.interpolate(grid, size=(math.ceil(side / 2),) * 2, mode="bilinear", align_corners=False)
    visual = pooled.flatten(2).transpose(1, 2).reshape(1, -1, hidden)
    text_before, text_after = language.embed_tokens(before.to(device)), language.embed_tokens(after.to(device))
    inputs = torch.cat([text_before, visual.to(text_before.dtype), text_after], 1)
    last = language(inputs_embeds=inputs, use_cache=True).last_hidden_state[:, -1]
    return llava.lm_head(last)[0]


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
    new_ids, mask = left_pad(ids, pad_id)
    new_labels = None if labels is None else left_pad([row.repeat_interleave(r) for row, r in zip(labels, repeats)], -100)[0]
    return new_ids, mask.to(attention_mask.dtype), new_labels


def train_baseline(cfg: TrainConfig, out: Path, progress: bool = True) -> list[float]:
    """Train the baseline of the from-scratch synthetic recipe `cfg`; write it to `out`. Returns the step losses.

    Raises `RecipeError` for a recipe that starts from a checkpoint or trains on a JSONL file.
    """
    from hyperowl.train.data import MicroBatches
    from hyperowl.train.policy import build_from_scratch
    from hyperowl.train.trainer import build_optimizer, lr_lambda, make_dataset, seed_everything, token_loss_sum

    if cfg.init_from is not None or cfg.synthetic_tasks is None:
        raise RecipeError("the baseline trains from scratch on synthetic tasks: give a recipe without init_from/train_file")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    owl, processor = build_from_scratch(replace(cfg, recency_prior=0.0))
    llava = build_baseline(owl, image_token_id=processor.image_token_id).train()
    for name, param in llava.named_parameters():
        # Like the recipe: the vision tower trains only with train_vision; its unused post_layernorm never does.
        unused_vision = "vision_tower" in name and (not cfg.train_vision or "post_layernorm" in name)
        param.requires_grad_(not unused_vision)
    vision = owl.config.vision_config
    tokens_per_image = vision.tokens_per_image
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    micro = MicroBatches(
        make_dataset(cfg, vision.image_size), processor, cfg.cut_enable, cfg.batch_size, cfg.grad_accum, 0, 1,
        cfg.seed, cfg.steps, cfg.length_groups,
    )
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="train baseline", disable=not progress)
    began = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as metrics:
        for step in range(cfg.steps):
            batches = [b for k in range(cfg.grad_accum) for b in micro[step * cfg.grad_accum + k]]
            total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            loss_sum = 0.0
            for batch in batches:
                ids, mask, labels = expand_image_tokens(
                    batch["input_ids"], batch["attention_mask"], batch["labels"], processor.image_token_id,
                    tokens_per_image, processor.pad_token_id,
                )
                logits = llava(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
                loss, _ = token_loss_sum(logits, labels)
                (loss / total).backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum / total)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = {"step": step + 1, "loss": losses[-1], "elapsed_s": time.perf_counter() - began}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
    bar.close()
    llava.eval().save_pretrained(str(out))
    processor.save_pretrained(out)
    return losses


def is_llava_checkpoint(path: str | Path) -> bool:
    """Whether `path/config.json` describes a transformers LLaVA model."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == LLAVA_MODEL_TYPE
    except (OSError, ValueError):
        return False


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
