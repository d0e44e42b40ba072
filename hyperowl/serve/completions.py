"""Chat completion requests -> scheduler jobs (limits checked, media loaded, prompt processed), and the
OpenAI response bodies and stream chunks built from the scheduler's events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from hyperowl.config import GenerationConfig
from hyperowl.engine.longvideo import expanded_prompt
from hyperowl.engine.sampling import SamplingParams
from hyperowl.errors import PromptError
from hyperowl.model.owl3 import DEFAULT_CHUNK_SIZE
from hyperowl.processing.processor import MEDIA_PATTERN, Owl3Processor
from hyperowl.processing.template import message_text
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.processing.video import DEFAULT_SAMPLING, Sampling
from hyperowl.serve.errors import ApiError, limit_error
from hyperowl.serve.media import (
    DecodeGate,
    MediaSource,
    image_size,
    load_checked_image,
    plan_checked_video,
    resolve_media,
)
from hyperowl.serve.media_cache import MediaCache, MediumInput, media_key
from hyperowl.serve.scheduler import Finished, Job, TokenLogprob
from hyperowl.serve.schema import ChatCompletionRequest, ChatMessage, ImageUrlPart, TextPart
from hyperowl.serve.settings import ServerSettings


@dataclass
class MediaPart:
    """One image or video of a request, in message order."""

    kind: str
    url: str
    max_frames: int
    sampling: Sampling = DEFAULT_SAMPLING


def check_text(messages: list[ChatMessage], settings: ServerSettings) -> None:
    """400 when the messages' text is longer than `max_text_chars` or is not valid Unicode (a lone
    surrogate, which JSON's `\\ud800` escapes can carry), checked before anything is tokenized."""
    texts = [
        text
        for message in messages
        for text in ([message.content] if isinstance(message.content, str) else [p.text for p in message.content if isinstance(p, TextPart)])
    ]
    total = sum(map(len, texts))
    if total > settings.max_text_chars:
        raise limit_error(f"the messages have {total} characters of text, more than {settings.max_text_chars}", "max_text_chars", "messages")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(
                400, f"message text is not valid Unicode: {exc.reason} at character {exc.start}", param="messages", code="invalid_prompt"
            ) from exc


def check_stops(stops: list[str], settings: ServerSettings) -> None:
    """400 beyond `max_stop_strings` stop strings or for one longer than `max_stop_chars`."""
    if len(stops) > settings.max_stop_strings:
        raise limit_error(f"{len(stops)} stop strings, more than {settings.max_stop_strings}", "max_stop_strings", "stop")
    longest = max(map(len, stops), default=0)
    if longest > settings.max_stop_chars:
        raise limit_error(f"a stop string has {longest} characters, more than {settings.max_stop_chars}", "max_stop_chars", "stop")


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


def media_pixels(media: list[MediaPart], sources: list[MediaSource], settings: ServerSettings) -> int:
    """The pixels decoding `media` will hold at most, from the images' headers (each counted up to
    `max_image_pixels`; larger ones are refused before they are decoded). Videos count nothing here:
    they are only planned now and decoded chunk by chunk while the model encodes them."""
    total = 0
    for part, source in zip(media, sources):
        if part.kind == "image":
            width, height = image_size(source)
            total += min(width * height, settings.max_image_pixels)
    return total


def process(
    messages: list[dict[str, Any]],
    media: list[MediaPart],
    sources: list[MediaSource],
    processor: Owl3Processor,
    settings: ServerSettings,
    media_cache: MediaCache | None = None,
    cut_enable: bool | None = None,
) -> dict[str, Any]:
    """Load the images and plan the videos within the limits, and run the processor (CPU work: call it
    in a thread). Video frames are decoded later, in the scheduler, while the model encodes them.

    With `media_cache`, a medium found there is not decoded at all: the prompt takes its kept expansion
    and the model its kept features; the others are expanded one by one and handed to the scheduler as
    views to encode and keep (`batch["media"]`, a `MediumInput` per medium in prompt order).
    Images are cut into tiles as `cut_enable` says (None: as the processor does).
    """
    cut = processor.cut_enable if cut_enable is None else cut_enable
    if media_cache is None or not media:
        images, videos = [], []
        for part, source in zip(media, sources):
            if part.kind == "image":
                images.append(load_checked_image(source, len(images), settings))
            else:
                videos.append(plan_checked_video(source, len(videos), processor.video_fps, part.max_frames, settings, part.sampling))
                check_frames(sum(len(plan) for plan in videos), settings)
        chunk = settings.vision_chunk_size or DEFAULT_CHUNK_SIZE
        return processor(messages, images=images, videos=videos, stream_video=True, stream_chunk_size=chunk, cut_enable=cut)
    texts = [message_text(message) for message in messages]
    found = [match.group(0) for text in texts for match in MEDIA_PATTERN.finditer(text)]
    wanted = [IMAGE_TOKEN if part.kind == "image" else VIDEO_TOKEN for part in media]
    if found != wanted:  # a placeholder typed into a text part
        raise PromptError(f"the messages hold {len(found)} media placeholder(s) for {len(wanted)} image or video part(s)")
    inputs: list[MediumInput] = []
    images = videos = frames = 0
    for part, source in zip(media, sources):
        view_settings = (part.kind, processor.image_size, processor.prompt_format, cut, processor.video_fps)
        if part.kind == "video":
            view_settings += (part.max_frames, part.sampling)
        key = media_key(source, view_settings)
        kept = media_cache.get(key)
        if kept is not None:
            medium = MediumInput(key, kept.placeholder, features=kept.features)
        elif part.kind == "image":
            image = load_checked_image(source, images, settings)
            (placeholder,), (views,), _ = processor.expand_media([IMAGE_TOKEN], [image], [], cut, processor.video_fps, None)
            medium = MediumInput(key, placeholder, views=views)
        else:
            plan = plan_checked_video(source, videos, processor.video_fps, part.max_frames, settings, part.sampling)
            (placeholder,), (views,), _ = processor.expand_media([VIDEO_TOKEN], [], [plan], False, processor.video_fps, None, stream=True)
            medium = MediumInput(key, placeholder, views=views)
        if part.kind == "image":
            images += 1
        else:
            videos += 1
            frames += medium.count
            check_frames(frames, settings)
        inputs.append(medium)
    placeholders = iter(inputs)
    expanded = [
        {"role": message["role"], "content": MEDIA_PATTERN.sub(lambda _: next(placeholders).placeholder, text)}
        for message, text in zip(messages, texts)
    ]
    return {**expanded_prompt(processor, expanded), "pixel_values": None, "media": inputs}


def check_frames(frames: int, settings: ServerSettings) -> None:
    """400 when the videos of a request have more than `max_frames` frames in all."""
    if frames > settings.max_frames:
        raise limit_error(f"the videos have more than {settings.max_frames} frames in all", "max_frames", "messages")


async def prepare_job(
    request: ChatCompletionRequest,
    processor: Owl3Processor,
    settings: ServerSettings,
    max_context: int,
    defaults: GenerationConfig | None = None,
    decode_gate: DecodeGate | None = None,
    media_cache: MediaCache | None = None,
    cut_enable: bool | None = None,
) -> Job:
    """Check `request` against the limits, load its media (through `decode_gate` when given; media kept in
    `media_cache` are not decoded again), process the prompt (images cut into tiles as `cut_enable` says,
    None: as the processor does); 4xx `ApiError` when it cannot run.

    Sampling fields the request leaves out take the model's generation defaults (`defaults`, its
    generation_config.json; greedy without one); a given `temperature` also sets sampling on (> 0) or
    off (0). `max_tokens` left out takes the model's `max_new_tokens` (at most `settings.max_tokens`),
    else `settings.default_max_tokens`.
    """
    defaults = defaults or GenerationConfig()
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
    default_tokens = settings.default_max_tokens if defaults.max_new_tokens is None else defaults.max_new_tokens
    max_tokens = request.max_completion_tokens or request.max_tokens or min(default_tokens, settings.max_tokens)
    if max_tokens > settings.max_tokens:
        raise limit_error(f"max_tokens {max_tokens} is more than {settings.max_tokens}", "max_tokens", "max_tokens")
    stops = request.stop_strings()
    check_stops(stops, settings)
    check_text(request.messages, settings)
    messages, media = convert_messages(request.messages, settings)
    sources = [await resolve_media(part.url, settings) for part in media]
    if media and decode_gate is not None:
        pixels = await run_in_threadpool(media_pixels, media, sources, settings)
        async with decode_gate.admit(pixels):
            batch = await run_in_threadpool(process, messages, media, sources, processor, settings, media_cache, cut_enable)
    else:
        batch = await run_in_threadpool(process, messages, media, sources, processor, settings, media_cache, cut_enable)
    prompt_tokens = batch["input_ids"].shape[1]
    if prompt_tokens + max_tokens > max_context:
        raise ApiError(
            400,
            f"the prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} that is more than the model's "
            f"context of {max_context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    given = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "seed": request.seed,
    }
    values = {**defaults.sampling_kwargs(), **{k: v for k, v in given.items() if v is not None}, "max_new_tokens": max_tokens}
    if request.temperature is not None:
        values["do_sample"] = request.temperature > 0
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_request") from exc
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
