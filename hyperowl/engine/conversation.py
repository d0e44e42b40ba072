"""Multi-turn chat over one conversation, reusing the text KV prefix and the visual K/V between turns;
each image and video is loaded, cut and converted once, in the turn that brings it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hyperowl.engine.generate import Owl3ForCausalLM, stream_text
from hyperowl.engine.longvideo import expanded_prompt
from hyperowl.engine.sampling import SamplingParams
from hyperowl.errors import PromptError
from hyperowl.model.cache import TextKVCache, VisualKV
from hyperowl.model.owl3 import PixelStream
from hyperowl.processing.image import image_to_tensor
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling, load_video


class ChatSession:
    """A conversation with one model. Each `ask` sends only what is new to the model:

    the tokens after the longest prefix already in the text KV cache, and the images not yet encoded
    (their visual K/V are appended to the cached ones). Only a turn's own media are loaded, cut into
    views and converted to pixels; earlier turns are kept with their placeholders already expanded
    (`expanded`), so no file is read twice and no pixels are made twice.
    """

    def __init__(
        self,
        model: Owl3ForCausalLM,
        processor: Owl3Processor,
        system: str | None = None,
        params: SamplingParams | None = None,
        vision_chunk_size: int | None = None,
        progress: bool = False,
        video_sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        self.model = model
        self.processor = processor
        self.params = params or SamplingParams()
        self.vision_chunk_size = vision_chunk_size
        self.progress = progress
        self.video_sampling = video_sampling
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        #: `messages` with each `<|image|>`/`<|video|>` already replaced by one `<|image|>` per view.
        self.expanded: list[dict[str, Any]] = list(self.messages)
        self.images: list[Any] = []
        self.videos: list[Any] = []
        self.cache: TextKVCache | None = None
        self.visual: VisualKV | None = None
        self.cached_ids: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.last_stats: dict[str, float] = {}

    def ask_stream(self, text: str, images: list[Any] | None = None, videos: list[Any] | None = None) -> Iterator[str]:
        """Add a user turn (`<|image|>`/`<|video|>` placeholders are prepended when the text has none)
        and yield the answer in text pieces as it is generated."""
        images, videos = list(images or []), list(videos or [])
        prefix = "<|image|>" * (len(images) - text.count("<|image|>")) + "<|video|>" * (len(videos) - text.count("<|video|>"))
        videos = [
            load_video(
                v,
                fps=self.processor.video_fps,
                max_frames=self.processor.max_frames,
                progress=self.progress,
                sampling=self.video_sampling,
                max_pixels=self.processor.max_pixels,
                frame_size=self.processor.image_size,
            )
            if isinstance(v, (str, Path))
            else v
            for v in videos
        ]
        content = prefix + text
        for token, kind, given in ((IMAGE_TOKEN, "image", images), (VIDEO_TOKEN, "video", videos)):
            if content.count(token) != len(given):
                raise PromptError(f"{content.count(token)} {token} placeholder(s) but {len(given)} {kind}(s) given")
        proc = self.processor
        (expanded_content,), views, _ = proc.expand_media(
            [content], images, videos, proc.cut_enable, proc.video_fps, proc.max_frames
        )
        messages = [*self.messages, {"role": "user", "content": content}]
        expanded = [*self.expanded, {"role": "user", "content": expanded_content}]
        batch = expanded_prompt(proc, expanded)
        # converted a chunk at a time while the model encodes: no float tensor of every frame at once
        chunk = self.vision_chunk_size or self.model.visual_options.chunk_size
        new_pixels = None
        if views:
            pieces = (image_to_tensor(views[i : i + chunk], proc.image_size) for i in range(0, len(views), chunk))
            new_pixels = PixelStream(len(views), pieces)
        # Bad input raised above; only now does the conversation take the new turn.
        self.messages, self.expanded = messages, expanded
        self.images, self.videos = self.images + images, self.videos + videos
        ids = batch["input_ids"][0]
        shared = self._shared_prefix(ids)
        if self.cache is not None:
            self.cache.truncate(shared)
        state: dict[str, Any] = {}
        inputs = {"input_ids": ids[shared:][None], "media_offset": batch["media_offset"][:, shared:], "pixel_values": new_pixels}
        yield from stream_text(
            self.model,
            self.processor,
            inputs,
            self.params,
            state,
            cache=self.cache,
            visual=self.visual,
            vision_chunk_size=self.vision_chunk_size,
        )
        self.cache, self.visual = state["cache"], state["visual"]
        # The cache holds the prompt and every answer token but the last one sampled.
        answer_ids = state["token_ids"]
        self.cached_ids = torch.cat([ids, torch.tensor(answer_ids[:-1], dtype=torch.long)])
        self.last_stats = {"first_token_s": state.get("first_token_s", 0.0), "prompt_tokens": len(ids) - shared, "new_tokens": len(answer_ids)}
        self.messages.append({"role": "assistant", "content": state["text"]})
        self.expanded.append({"role": "assistant", "content": state["text"]})

    def ask(self, text: str, images: list[Any] | None = None, videos: list[Any] | None = None) -> str:
        """`ask_stream`, joined."""
        return "".join(self.ask_stream(text, images, videos))

    def _shared_prefix(self, ids: torch.Tensor) -> int:
        """Length of the longest common prefix with the cached tokens, leaving at least one new token."""
        n = min(len(self.cached_ids), len(ids) - 1)
        if n <= 0:
            return 0
        diff = (self.cached_ids[:n] != ids[:n]).nonzero()
        return int(diff[0]) if len(diff) else n
