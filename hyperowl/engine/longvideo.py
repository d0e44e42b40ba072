"""Long videos end to end with bounded memory: file -> frames (decoded in a background thread, in
chunks) -> vision tower -> visual K/V -> first token, with no step holding every frame at once.

The prompt is sized from the video's packet index (`plan_video`) before decoding starts, so the
visual K/V storage is preallocated (and checked against the memory budget) up front; then decoding
of chunk i+1 overlaps the encoding of chunk i.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hyperowl.model.owl3 import DEFAULT_CHUNK_SIZE, PixelStream
from hyperowl.processing.stream import STREAM_DEPTH, pixel_chunks, video_views
from hyperowl.processing.template import render_chat_with_spans
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling, VideoFileSource, plan_video

if TYPE_CHECKING:
    from hyperowl.engine.generate import GenerationOutput
    from hyperowl.model.owl3 import Owl3Model
    from hyperowl.processing.processor import Owl3Processor


def video_pixel_stream(
    src: VideoFileSource,
    image_size: int,
    *,
    fps: float = 1.0,
    max_frames: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pin_memory: bool = False,
    depth: int = STREAM_DEPTH,
    sampling: Sampling = DEFAULT_SAMPLING,
) -> PixelStream:
    """The sampled frames of a video file as pixel chunks `[n <= chunk_size, 3, S, S]` (float32,
    normalised as the processor does), decoded up to `depth` chunks ahead in a background thread
    (`hyperowl.processing.stream`); one model call consumes them.

    `total` is known from the packet index before decoding starts. `pin_memory` pins each chunk so its
    copy to a GPU overlaps the work. `sampling`: how frames are reached (`hyperowl.processing.video.Sampling`).
    Raises `MediaError` for unreadable files (here or while iterating).
    """
    plan = plan_video(src, fps=fps, max_frames=max_frames, sampling=sampling)
    medium = video_views(plan, image_size, [])
    return PixelStream(medium.count, pixel_chunks([medium], image_size, chunk_size, pin_memory=pin_memory, depth=depth))


def video_prompt(processor: Owl3Processor, question: str, num_frames: int, system: str | None = None) -> dict[str, torch.Tensor]:
    """Model inputs (batch 1, no pixels) for `question` about a video of `num_frames` frames: the
    processor's rendering of a user turn `<|video|>\\n{question}` with the video expanded to one
    `<|image|>` per frame. Keys: `input_ids`, `attention_mask` `[1, T]`, `media_offset` `[1, T, 2]`."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": f"{VIDEO_TOKEN}\n{question}".replace(VIDEO_TOKEN, IMAGE_TOKEN * num_frames)}
    ]
    return expanded_prompt(processor, messages)


def expanded_prompt(processor: Owl3Processor, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Model inputs (batch 1, no pixels) of one conversation whose media placeholders are already
    expanded (one `<|image|>` per view, as `Owl3Processor` expands them), rendered and tokenized as the
    processor does, with a generation prompt. Keys: `input_ids`, `attention_mask` `[1, T]`,
    `media_offset` `[1, T, 2]` (every token sees the views before it)."""
    prompt, _ = render_chat_with_spans(messages, True)
    ids = torch.tensor([processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    is_image = ids == processor.image_token_id
    seen = torch.cumsum(is_image, dim=1) - is_image.long()
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "media_offset": torch.stack([torch.zeros_like(seen), seen], dim=-1),
    }


def answer_video(
    model: Owl3Model,
    processor: Owl3Processor,
    src: VideoFileSource,
    question: str,
    *,
    fps: float = 1.0,
    max_frames: int | None = None,
    system: str | None = None,
    sampling: Sampling = DEFAULT_SAMPLING,
    **generate_kwargs: Any,
) -> GenerationOutput:
    """Answer `question` about the video `src` with frames streamed through the model in chunks of
    `model.visual_options.chunk_size`. `generate_kwargs` go to `model.generate` (`max_new_tokens`, ...).

    Raises:
        ResourceLimitError: before decoding, when the sampled frames would not fit in memory.
    """
    stream = video_pixel_stream(
        src,
        model.config.vision_config.image_size,
        fps=fps,
        max_frames=max_frames,
        chunk_size=model.visual_options.chunk_size,
        pin_memory=model.device.type == "cuda",
        sampling=sampling,
    )
    batch = video_prompt(processor, question, stream.total, system)
    generate_kwargs.setdefault("stop_token_ids", processor.stop_token_ids)
    return model.generate(**batch, pixel_values=stream, **generate_kwargs)
