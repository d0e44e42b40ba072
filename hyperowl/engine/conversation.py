"""Multi-turn chat over one conversation, reusing the text KV prefix and the visual K/V between turns;
each image and video is loaded (a video file streamed) and encoded once, in the turn that brings it."""

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
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.stream import pixel_stream
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling, plan_video


class ChatSession:
    """A conversation with one model. Each `ask` sends only what is new to the model:

    the tokens after the longest prefix already in the text KV cache, and the images not yet encoded
    (their visual K/V are appended to the cached ones). Only a turn's own media are loaded and cut into
    views. A video file is streamed: its packet index gives the frame count for the prompt, then its
    frames are decoded in a background thread while the model encodes the chunks before, so at most
    three chunks of `vision_chunk_size` frames exist at once (`hyperowl.processing.stream`), and the
    first token follows the last chunk. Earlier turns are kept with their placeholders already expanded
    (`expanded`) and their visual K/V, so no file is read twice and no frame is encoded twice.

    A turn that fails (bad input, a video that stops decoding) or whose answer is not read to the end
    leaves the conversation as it was.
    """

    def __init__(
        self,
        model: Owl3ForCausalLM,
        processor: Owl3Processor,
        system: str | None = None,
        params: SamplingParams | None = None,
        vision_chunk_size: int | None = None,
        video_sampling: Sampling = DEFAULT_SAMPLING,
    ) -> None:
        self.model = model
        self.processor = processor
        self.params = params or SamplingParams()
        self.vision_chunk_size = vision_chunk_size
        self.video_sampling = video_sampling
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        #: `messages` with each `<|image|>`/`<|video|>` already replaced by one `<|image|>` per view.
        self.expanded: list[dict[str, Any]] = list(self.messages)
        #: The media of every turn as they were given (video files by name, not their frames).
        self.images: list[Any] = []
        self.videos: list[Any] = []
        self.cache: TextKVCache | None = None
        self.visual: VisualKV | None = None
        self.cached_ids: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.last_stats: dict[str, float] = {}

    def ask_stream(self, text: str, images: list[Any] | None = None, videos: list[Any] | None = None) -> Iterator[str]:
        """Add a user turn (`<|image|>`/`<|video|>` placeholders are prepended when the text has none)
        and yield the answer in text pieces as it is generated. Video files are sampled as
        `video_sampling` says; a progress bar shows on a terminal while a long video is encoded."""
        images, videos = list(images or []), list(videos or [])
        prefix = "<|image|>" * (len(images) - text.count("<|image|>")) + "<|video|>" * (len(videos) - text.count("<|video|>"))
        content = prefix + text
        for token, kind, given in ((IMAGE_TOKEN, "image", images), (VIDEO_TOKEN, "video", videos)):
            if content.count(token) != len(given):
                raise PromptError(f"{content.count(token)} {token} placeholder(s) but {len(given)} {kind}(s) given")
        proc = self.processor
        planned = [
            plan_video(v, fps=proc.video_fps, max_frames=proc.max_frames, sampling=self.video_sampling, max_pixels=proc.max_pixels)
            if isinstance(v, (str, Path))
            else v
            for v in videos
        ]
        (expanded_content,), media, _ = proc.expand_media(
            [content], images, planned, proc.cut_enable, proc.video_fps, proc.max_frames, stream=True
        )
        messages = [*self.messages, {"role": "user", "content": content}]
        expanded = [*self.expanded, {"role": "user", "content": expanded_content}]
        batch = expanded_prompt(proc, expanded)
        chunk = self.vision_chunk_size or self.model.visual_options.chunk_size
        new_pixels = pixel_stream(media, proc.image_size, chunk, pin_memory=self.model.device.type == "cuda") if media else None
        ids = batch["input_ids"][0]
        shared = self._shared_prefix(ids)
        if self.cache is not None:
            self.cache.truncate(shared)
        self.cached_ids = self.cached_ids[:shared]  # what the cache holds, whether or not this turn completes
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
        # The answer is complete: only now does the conversation take the turn.
        answer = {"role": "assistant", "content": state["text"]}
        self.messages, self.expanded = [*messages, answer], [*expanded, answer]
        self.images, self.videos = self.images + images, self.videos + videos
        self.cache, self.visual = state["cache"], state["visual"]
        # The cache holds the prompt and every answer token but the last one sampled.
        answer_ids = state["token_ids"]
        self.cached_ids = torch.cat([ids, torch.tensor(answer_ids[:-1], dtype=torch.long)])
        self.last_stats = {"first_token_s": state.get("first_token_s", 0.0), "prompt_tokens": len(ids) - shared, "new_tokens": len(answer_ids)}

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
