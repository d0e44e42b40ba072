"""`Owl3Model`: vision tower + projector + hyper Qwen2 decoder (official `mPLUGOwl3Model` layout).

The model owns its caches (`hyperowl.model.cache`) and its checkpoint I/O (`hyperowl.model.checkpoint`);
generation and memory policy live above it, in `hyperowl.engine`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from typing_extensions import Self

from hyperowl.config import GenerationConfig, Owl3Config
from hyperowl.errors import PromptError
from hyperowl.model.cache import TextKVCache, VisualKV
from hyperowl.model.checkpoint import load_checkpoint, save_checkpoint
from hyperowl.model.decoder import CrossPlan, HyperQwen2ForCausalLM, StepContext, rotary_cos_sin
from hyperowl.model.vision import SiglipVisionTower

#: Images encoded at once unless `VisualOptions.chunk_size` says otherwise.
DEFAULT_CHUNK_SIZE = 32


@dataclass
class VisualOptions:
    """How a request's images are turned into visual K/V.

    chunk_size: images encoded at once (vision tower + K/V); bounds the activation memory.
    kv_dtype: storage dtype of the visual K/V (e.g. `torch.float8_e4m3fn`, or `torch.bfloat16` for
        an fp32 model); None keeps the model dtype. They are cast back to the model dtype at use.
    offload: where the engine puts the visual K/V when the model is on a GPU: "never" (on the GPU), "always"
        (pinned CPU memory, copied to the GPU one layer at a time at use) or "auto" (on the GPU when
        they fit the budget, else on the CPU).
    memory_budget: bytes a request may use on the model's device (None: the free device memory;
        on the CPU the available system memory). `offload` and `memory_budget` are policy, read by
        the engine's planning (`hyperowl.engine.memory.plan_visual_memory`) before a prefill.
    attention_block: most elements (batch x heads x queries x visual tokens) of one prefill
        cross-attention block; None: 2**22 on the CPU, 2**31 on a GPU (whose kernels do not
        materialise the scores; the bool mask of a block is `attention_block / kv_heads` bytes).
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    kv_dtype: torch.dtype | None = None
    offload: Literal["never", "auto", "always"] = "auto"
    memory_budget: int | None = None
    attention_block: int | None = None

    def block_elements(self, device: torch.device) -> int:
        if self.attention_block is not None:
            return self.attention_block
        return 2**22 if device.type == "cpu" else 2**31


@dataclass
class PixelStream:
    """`total` images arriving in chunks, in image order: pixels `[n, 3, S, S]`, or features the vision
    tower and projector already made from them (`[n, tokens_per_image, H]`, e.g. kept from an earlier
    request), which go straight to the hyper layers' K/V. Each model call iterates `chunks` once: an
    iterator serves one call, an iterable that starts afresh at each `iter` serves any number."""

    total: int
    chunks: Iterable[torch.Tensor]


def uploaded(parts: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """`parts` on `device`, each moved when it is asked for. To a CUDA device a host part is copied from
    pinned memory on a side stream, and the current stream waits for the copy on the device, not the
    host: the host goes on queueing work while the copy runs beside the work queued before it (a copy
    from pageable memory would block the host until the GPU has finished that work)."""
    if device.type != "cuda":
        yield from (part.to(device) for part in parts)
        return
    copies = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    for part in parts:
        if part.device == device:
            yield part
            continue
        pinned = part if part.is_pinned() else part.pin_memory()
        with torch.cuda.stream(copies):
            moved = pinned.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copies)
        current.wait_event(done)
        moved.record_stream(current)  # the allocator must not reuse it while the current stream reads it
        yield moved


@dataclass
class Owl3Output:
    """`logits` `[B, T, vocab]` (or only the last `logits_to_keep` positions); `loss` when labels were given;
    `visual` the visual K/V used (reuse it for later steps of the same requests)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    visual: VisualKV | None = None


def prompt_positions(attention_mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Rotary positions `[B, T]` of the tokens of `attention_mask` `[B, T]` after `start` (`[B, 1]`, the
    positions a cache already holds): padding does not advance them (left padding stays at `start`)."""
    return start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def image_rows(media_offset: torch.Tensor, num_images: int) -> list[range]:
    """Global image indices of each row: row b owns `[first_b, first_{b+1})`, the last row up to `num_images`."""
    firsts = media_offset[:, 0, 0].tolist()
    ends = firsts[1:] + [num_images]
    if any(e < f for f, e in zip(firsts, ends)) or (firsts and firsts[0] != 0):
        raise PromptError(f"media_offset rows do not partition the {num_images} images: row starts {firsts}")
    return [range(f, e) for f, e in zip(firsts, ends)]


def image_positions(counts: torch.Tensor, position_ids: torch.Tensor, first_local: int, num_local: int) -> torch.Tensor:
    """MI-Rope position of each image of one row (SPEC §2.4): the position just after its `<|image|>` token.

    `counts` `[T]`: images visible to each token (non-decreasing, strictly-before rule);
    `position_ids` `[T]`. Local images `first_local .. first_local + num_local - 1` -> positions `[num_local]`.
    The `<|image|>` token of image k sits just before the first token whose count exceeds k; if no token
    does, it is the last token.
    """
    wanted = torch.arange(first_local, first_local + num_local, device=counts.device)
    after = torch.searchsorted(counts.contiguous(), wanted, right=True)
    if num_local > 1 and bool((after[:-1] >= counts.shape[0]).any()):
        raise PromptError(f"the prompt has fewer <|image|> tokens than its {first_local + num_local} images")
    return position_ids[after - 1] + 1


class Owl3Model(nn.Module):
    """mPLUG-Owl3 (the official `mPLUGOwl3Model`): `forward(**processor_batch)` -> `Owl3Output`.

    `visual_options` (`VisualOptions`) say how image input is encoded and stored: chunk size, storage
    dtype of the visual K/V, cross-attention block size (and the engine's offload / budget policy).
    Generation: `hyperowl.Owl3ForCausalLM`, this model plus `generate`.
    """

    def __init__(self, config: Owl3Config) -> None:
        super().__init__()
        self.config = config
        fused = bool(config.fused_hyper_attention)
        self.vision_model = SiglipVisionTower(config.vision_config)
        self.vision2text_model = nn.Linear(config.vision_config.hidden_size, config.hidden_size, bias=True)
        self.language_model = HyperQwen2ForCausalLM(config, fused)
        self.visual_options = VisualOptions()
        #: Sampling defaults of `generate`, `hyperowl chat` and `serve` (the checkpoint's generation_config.json).
        self.generation_config = GenerationConfig()

    @property
    def device(self) -> torch.device:
        return self.vision2text_model.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision2text_model.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """`pixel_values` `[N, 3, S, S]` -> projected image features `[N, tokens_per_image, H]`, `chunk_size` images at a time."""
        chunk = chunk_size or max(1, pixel_values.shape[0])
        return torch.cat([self.encode_chunk(pixel_values[i : i + chunk]) for i in range(0, pixel_values.shape[0], chunk)])

    def encode_chunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, 3, S, S]` (any device/dtype) -> projected features `[n, tokens_per_image, H]` on the model's device."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        return self.vision2text_model(self.vision_model(pixels))

    def allocate_visual(self, num_images: list[int], offload: bool = False) -> VisualKV:
        """Empty visual K/V storage for rows of `num_images[b]` images in `visual_options.kv_dtype`: on
        the model's device, or with `offload` (a GPU model only) in pinned CPU memory."""
        cfg, opts = self.config, self.visual_options
        offload = offload and self.device.type == "cuda"
        return VisualKV.allocate(
            len(self.language_model.model.hyper_layers),
            num_images,
            cfg.vision_config.tokens_per_image,
            cfg.num_key_value_heads,
            cfg.head_dim,
            opts.kv_dtype or self.dtype,
            "cpu" if offload else self.device,
            self.device,
            pin_memory=offload,
        )

    def write_visual(
        self, visual: VisualKV, image_embeds: torch.Tensor, first: int, rows: list[range], positions: list[torch.Tensor]
    ) -> None:
        """Turn the features `image_embeds` `[n, P, H]` of global images `first .. first + n - 1` into the
        K/V of every hyper layer (SPEC §2.1-2.4) and write them into `visual`.

        Row b owns global images `rows[b]`, stored at local index `global - rows[b].start`, with MI-Rope
        positions `positions[b]` `[len(rows[b])]`.
        """
        n = image_embeds.shape[0]
        for b, r in enumerate(rows):
            lo, hi = max(first, r.start), min(first + n, r.stop)
            if lo >= hi:
                continue
            feats = image_embeds[lo - first : hi - first]
            pos = positions[b][lo - r.start : hi - r.start].to(feats.device)[:, None]
            cos, sin = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_theta, feats.dtype)
            for index, layer in enumerate(self.language_model.model.hyper_layers):
                k, v = layer.self_attn.visual_kv(layer.input_layernorm(feats), cos, sin)
                visual.write(index, b, lo - r.start, k, v)

    def build_visual_kv(
        self,
        image_embeds: torch.Tensor,
        rows: list[range],
        positions: list[torch.Tensor],
        chunk_size: int | None = None,
    ) -> VisualKV:
        """Visual K/V of every hyper layer for each row from already encoded features, computed once per request.

        `image_embeds` `[N, P, H]`; row b's images are `image_embeds[rows[b]]` at MI-Rope positions
        `positions[b]` `[len(rows[b])]`; `chunk_size` images at a time (default `visual_options`).
        """
        visual = self.allocate_visual([len(r) for r in rows])
        chunk = chunk_size or self.visual_options.chunk_size
        for i in range(0, image_embeds.shape[0], chunk):
            self.write_visual(visual, image_embeds[i : i + chunk], i, rows, positions)
        return visual

    def prepare_visual(
        self,
        pixel_values: torch.Tensor | PixelStream,
        media_offset: torch.Tensor,
        position_ids: torch.Tensor,
        previous: VisualKV | None = None,
        chunk_size: int | None = None,
        offload: bool = False,
    ) -> VisualKV:
        """Encode `pixel_values` (`[N, 3, S, S]`, or a `PixelStream` whose chunks are still being decoded)
        and build their visual K/V chunk by chunk: each chunk goes pixels -> features -> K/V of every
        hyper layer into preallocated storage, so memory holds one chunk of activations at a time.
        With `previous` (an earlier turn of the same conversations, batch 1) the new images are
        appended after the cached ones. `chunk_size` defaults to `visual_options.chunk_size`; `offload`
        keeps the new visual K/V in pinned CPU memory (see `allocate_visual`).
        """
        steps = self.visual_steps(pixel_values, media_offset, position_ids, previous, chunk_size, offload)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def visual_steps(
        self,
        pixel_values: torch.Tensor | PixelStream,
        media_offset: torch.Tensor,
        position_ids: torch.Tensor,
        previous: VisualKV | None = None,
        chunk_size: int | None = None,
        offload: bool = False,
    ) -> Generator[int, None, VisualKV]:
        """`prepare_visual` one chunk of `pixel_values` per step, so a caller can do other work between
        chunks (a server decoding other requests): yields the images written so far after each chunk
        and returns the visual K/V. Arguments as in `prepare_visual`."""
        stream = pixel_values if isinstance(pixel_values, PixelStream) else PixelStream(pixel_values.shape[0], [pixel_values])
        if previous is None:
            rows = image_rows(media_offset, stream.total)
            first_local = [0] * len(rows)
        else:
            if media_offset.shape[0] != 1:
                raise PromptError("adding images to a cached conversation is supported one conversation at a time")
            rows = [range(stream.total)]
            first_local = [int(previous.num_images[0])]
        counts = media_offset[..., 1] - media_offset[..., 0]
        positions = [image_positions(counts[b], position_ids[b], first_local[b], len(r)) for b, r in enumerate(rows)]
        visual = self.allocate_visual([len(r) for r in rows], offload)
        chunk = chunk_size or self.visual_options.chunk_size
        done = 0
        # shown on a terminal only, and only when encoding takes more than a second
        with tqdm(total=stream.total, desc="vision", unit="img", delay=1.0, disable=None, leave=False) as bar:
            for pixels in stream.chunks:
                written = self._write_chunk(visual, pixels, done, stream.total, rows, positions, chunk)
                bar.update(written - done)
                done = written
                del pixels  # freed before the next chunk is asked for: a stream's chunks are not all alive at once
                yield done
        if done != stream.total:
            raise PromptError(f"the prompt has {stream.total} <|image|> tokens but only {done} images arrived")
        return visual if previous is None else previous.extend(visual)

    def _write_chunk(
        self,
        visual: VisualKV,
        pixels: torch.Tensor,
        first: int,
        total: int,
        rows: list[range],
        positions: list[torch.Tensor],
        chunk: int,
    ) -> int:
        """Encode one chunk of a `PixelStream` (pixels, or features as they are), `chunk` images at a time,
        into `visual` as global images `first, first + 1, ...` of `total`; return the images written so far."""
        if first + pixels.shape[0] > total:
            raise PromptError(f"got more than the {total} images the prompt has <|image|> tokens for")
        for part in uploaded((pixels[i : i + chunk] for i in range(0, pixels.shape[0], chunk)), self.device):
            features = part.to(self.dtype) if part.dim() == 3 else self.encode_chunk(part)
            self.write_visual(visual, features, first, rows, positions)
            first += part.shape[0]
        return first

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media_offset: torch.Tensor | None = None,
        pixel_values: torch.Tensor | PixelStream | None = None,
        labels: torch.Tensor | None = None,
        cache: TextKVCache | None = None,
        visual: VisualKV | None = None,
        logits_to_keep: int = 0,
        vision_chunk_size: int | None = None,
        offload_visual: bool = False,
    ) -> Owl3Output:
        """One forward over `input_ids` `[B, T]`.

        `media_offset` `[B, T, 2]` (SPEC §3) says which images each token sees; without it, every token
        sees all images of its row (the decode rule). `cache` is updated in place; `visual` is reused
        (new `pixel_values` `[N, 3, S, S]` or a `PixelStream` are appended to it, encoded
        `vision_chunk_size` images at a time, default `visual_options.chunk_size`, into pinned CPU memory
        with `offload_visual`).
        `labels` `[B, T]` (-100 = ignore) give a shifted CE loss.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device
        if cache is not None:
            start = cache.positions[:, None]
            cache.begin_step(attention_mask)
            key_valid = cache.valid[:, : cache.length + input_ids.shape[1]]
        else:
            start = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=device)
            key_valid = attention_mask.bool()
        position_ids = prompt_positions(attention_mask, start)
        if pixel_values is not None:
            if media_offset is None:
                raise PromptError("pixel_values were given without media_offset")
            visual = self.prepare_visual(pixel_values, media_offset, position_ids, visual, vision_chunk_size, offload_visual)

        t, k_len = input_ids.shape[1], key_valid.shape[1]
        query_col = torch.arange(k_len - t, k_len, device=device)[:, None]
        key_col = torch.arange(k_len, device=device)[None, :]
        self_mask = ((key_col <= query_col) & key_valid[:, None, :]) | (key_col == query_col)
        cross = None
        if visual is not None and self.language_model.model.hyper_layers:
            if media_offset is not None:
                counts = (media_offset[..., 1] - media_offset[..., 0]).to(device)
            else:
                counts = visual.num_images[:, None].expand(-1, t)
            cfg = self.config
            cross = CrossPlan.build(
                counts,
                visual.tokens_per_image,
                cfg.num_attention_heads,
                k_len if cfg.fused_hyper_attention else 0,
                self.visual_options.block_elements(device),
            )
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, self.dtype)
        ctx = StepContext(cos, sin, self_mask[:, None], cache, visual, cross)
        hidden = self.language_model.model(input_ids, ctx)
        if cache is not None:
            cache.end_step(attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device), ignore_index=-100)
        return Owl3Output(logits=logits, loss=loss, visual=visual)

    def decode_plan(self, visual: VisualKV | None) -> CrossPlan | None:
        """The cross-attention plan of a decode step over `visual` (each row sees all its images); it
        stays the same while the rows and their images do, so `decode` steps can share it."""
        if visual is None or not self.language_model.model.hyper_layers:
            return None
        counts = visual.num_images[:, None]
        cfg = self.config
        return CrossPlan.build(counts, visual.tokens_per_image, cfg.num_attention_heads, 0, 2**62)

    def decode(
        self,
        tokens: torch.Tensor,
        cache: TextKVCache,
        write_index: torch.Tensor,
        visual: VisualKV | None = None,
        cross: CrossPlan | None = None,
    ) -> torch.Tensor:
        """One decode step with shapes that do not change from step to step (so it can be replayed
        from a CUDA graph): `tokens` `[B]` are written at column `write_index` (`[1]` long, on the
        model's device) of `cache` and attend to every valid column of its whole capacity; `cross` is
        `decode_plan(visual)`. Returns the next-token logits `[B, vocab]`.

        Only `cache`'s column `write_index` (keys, values, `valid`) changes: the caller advances the
        write index and the positions afterwards (`TextKVCache.advance`), so running the step twice
        is harmless (CUDA-graph warm-up).
        """
        cache.valid.index_fill_(1, write_index, True)
        cos, sin = rotary_cos_sin(cache.positions[:, None], self.config.head_dim, self.config.rope_theta, self.dtype)
        ctx = StepContext(cos, sin, cache.valid[:, None, None, :], cache, visual, cross, write_index)
        hidden = self.language_model.model(tokens[:, None], ctx)
        return self.language_model.lm_head(hidden[:, -1])

    def new_cache(self, batch: int, capacity: int) -> TextKVCache:
        cfg = self.config
        return TextKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, capacity, self.dtype, self.device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
    ) -> Self:
        """Load an official-format checkpoint (config.json + safetensors, sharded or not) from a directory
        or a Hugging Face Hub repository id such as ``mPLUG/mPLUG-Owl3-7B-241101``."""
        return load_checkpoint(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json, generation_config.json (`generation_config`) and safetensors shards (with an
        index when sharded) in the official layout."""
        save_checkpoint(self, path, max_shard_bytes=max_shard_bytes)
        self.generation_config.save_pretrained(path)
