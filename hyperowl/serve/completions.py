"""Chat completion requests -> scheduler jobs (limits checked, media loaded, prompt processed), and the
OpenAI response bodies and stream chunks built from the scheduler's events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from hyperowl.engine.sampling import SamplingParams
from hyperowl.processing.processor import Owl3Batch, Owl3Processor
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling
from hyperowl.serve.errors import ApiError, limit_error
from hyperowl.serve.media import MediaSource, load_checked_image, load_checked_video, resolve_media
from hyperowl.serve.scheduler import Finished, Job, TokenLogprob
from hyperowl.serve.schema import ChatCompletionRequest, ChatMessage, ImageUrlPart, TextPart
from hyperowl.serve.settings import ServerSettings

#: OpenAI accepts at most this many stop strings.
MAX_STOP_STRINGS = 4


@dataclass
class MediaPart:
    """One image or video of a request, in message order."""

    kind: str
    url: str
    max_frames: int
    sampling: Sampling = DEFAULT_SAMPLING


def convert_messages(messages: list[ChatMessage], settings: ServerSettings) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    """OpenAI messages -> processor messages (parts `text`/`image`/`video`) and their media in order."""
    converted, media = [], []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            converted.append({"role": role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImageUrlPart):
                parts.append({"type": "image"})
                media.append(MediaPart("image", part.image_url.url, 0))
            else:
                frames = part.video_url.max_frames or min(settings.default_frames, settings.max_frames)
                if frames > settings.max_frames:
                    raise limit_error(f"video max_frames {frames} is more than {settings.max_frames}", "max_frames", "messages")
                parts.append({"type": "video"})
                media.append(MediaPart("video", part.video_url.url, frames, part.video_url.sampling))
        converted.append({"role": role, "content": parts})
    images = sum(m.kind == "image" for m in media)
    if images > settings.max_images:
        raise limit_error(f"{images} images in the request, more than {settings.max_images}", "max_images", "messages")
    return converted, media


def process(
    messages: list[dict[str, Any]],
    media: list[MediaPart],
    sources: list[MediaSource],
    processor: Owl3Processor,
    settings: ServerSettings,
) -> Owl3Batch:
    """Decode the media within the limits and run the processor (CPU work: call it in a thread)."""
    images, videos, frames = [], [], 0
    for part, source in zip(media, sources):
        if part.kind == "image":
            images.append(load_checked_image(source, len(images), settings))
            continue
        clip = load_checked_video(source, len(videos), processor.video_fps, part.max_frames, settings, part.sampling)
        frames += len(clip)
        if frames > settings.max_frames:
            raise limit_error(f"the videos have more than {settings.max_frames} frames in all", "max_frames", "messages")
        videos.append(clip)
    return processor(messages, images=images, videos=videos)


async def prepare_job(
    request: ChatCompletionRequest, processor: Owl3Processor, settings: ServerSettings, max_context: int
) -> Job:
    """Check `request` against the limits, load its media, process the prompt; 4xx `ApiError` when it cannot run."""
    unsupported = request.unsupported_features()
    if unsupported:
        raise ApiError(
            400,
            f"hyperowl does not support {', '.join(unsupported)}; leave {'them' if len(unsupported) > 1 else 'it'} out of the request",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = request.max_completion_tokens or request.max_tokens or min(settings.default_max_tokens, settings.max_tokens)
    if max_tokens > settings.max_tokens:
        raise limit_error(f"max_tokens {max_tokens} is more than {settings.max_tokens}", "max_tokens", "max_tokens")
    stops = request.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}", param="stop")
    messages, media = convert_messages(request.messages, settings)
    sources = [await resolve_media(part.url, settings) for part in media]
    batch = await run_in_threadpool(process, messages, media, sources, processor, settings)
    prompt_tokens = batch["input_ids"].shape[1]
    if prompt_tokens + max_tokens > max_context:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} that is more than the model's "
            f"context of {max_context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    temperature = 1.0 if request.temperature is None else request.temperature
    params = SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=request.seed,
    )
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return Job(batch, params, stops, request.ignore_eos, settings.request_timeout_s, top_logprobs)


def usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def logprobs_field(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """A choice's `logprobs`: `{"content": entries}`, or None when they were not requested."""
    return None if entries is None else {"content": entries}


def completion_body(
    ident: str, created: int, model: str, text: str, done: Finished, logprobs: list[TokenLogprob] | None = None
) -> dict[str, Any]:
    """A `chat.completion` object."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs_field(logprobs),
        "finish_reason": done.finish_reason,
    }
    return {"id": ident, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "usage": usage(done)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def chunk(
    ident: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    logprobs: list[TokenLogprob] | None = None,
) -> str:
    """A `chat.completion.chunk` event; `delta=None` gives the usage-only chunk (no choices)."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs_field(logprobs), "finish_reason": finish_reason}
    choices = [] if delta is None else [choice]
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)
