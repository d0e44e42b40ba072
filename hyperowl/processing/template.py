"""ChatML prompt rendering of mPLUG-Owl3 conversations, with the character spans training labels cover.

Rendered form::

    <|im_start|>system\\n{system or empty}<|im_end|>
    \\n<|im_start|>user\\n{content}<|im_end|>
    \\n<|im_start|>assistant\\n{content}<|im_end|><|endoftext|>
    ...
    \\n<|im_start|>assistant\\n            (generation prompt)

(line breaks above only for reading; each ``\\n`` is one newline character).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hyperowl.errors import PromptError
from hyperowl.processing.tokenizer import ENDOFTEXT, IM_END, IM_START, IMAGE_TOKEN, VIDEO_TOKEN

Message = Mapping[str, Any]

ROLES = ("system", "user", "assistant")


def message_text(message: Message) -> str:
    """Text of one message, with image parts as ``<|image|>`` and video parts as ``<|video|>``.

    ``content`` is a string or a list of parts ``{"type": "text", "text": ...}``,
    ``{"type": "image", ...}`` or ``{"type": "video", ...}``.
    """
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise PromptError(f"a message must be a dict with 'role' and 'content'; got {message!r}")
    if message["role"] not in ROLES:
        raise PromptError(f"unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise PromptError(f"message content must be a string or a list of parts; got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind == "image":
            pieces.append(IMAGE_TOKEN)
        elif kind == "video":
            pieces.append(VIDEO_TOKEN)
        else:
            raise PromptError(f"unknown content part {part!r}; expected type 'text', 'image' or 'video'")
    return "".join(pieces)


def part_media(messages: Sequence[Message], kind: str) -> list[Any]:
    """Media sources carried inside content parts, in order: the ``part[kind]`` of each part of type ``kind``.

    Parts without a ``kind`` key (e.g. a bare ``{"type": "image"}``) are skipped; the caller then
    has to pass the media separately.
    """
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == kind and kind in part:
                found.append(part[kind])
    return found


def render_chat_with_spans(
    messages: Sequence[Message], add_generation_prompt: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation in ChatML and locate its assistant parts.

    Args:
        messages: ``{"role", "content"}`` dicts; an optional system message must come first.
            A final assistant message with empty content is the generation prompt (the official
            demo's convention).
        add_generation_prompt: end with ``\\n<|im_start|>assistant\\n`` when the conversation does
            not already end with an assistant answer. False never adds it.

    Returns:
        ``(text, spans)`` with one ``(start, end)`` character span per answered assistant turn,
        covering its content, ``<|im_end|>`` and ``<|endoftext|>``.
    """
    if not messages:
        raise PromptError("a conversation needs at least one message")
    texts = [message_text(message) for message in messages]
    roles = [message["role"] for message in messages]
    system = ""
    if roles[0] == "system":
        system, roles, texts = texts[0], roles[1:], texts[1:]
    if "system" in roles:
        raise PromptError("a system message is only allowed as the first message")
    generation_turn = bool(roles) and roles[-1] == "assistant" and texts[-1] == ""
    if generation_turn:
        roles, texts = roles[:-1], texts[:-1]
    out = f"{IM_START}system\n{system}{IM_END}"
    spans: list[tuple[int, int]] = []
    for role, text in zip(roles, texts):
        out += f"\n{IM_START}{role}\n"
        if role == "assistant":
            start = len(out)
            out += f"{text}{IM_END}{ENDOFTEXT}"
            spans.append((start, len(out)))
        else:
            out += f"{text}{IM_END}"
    if generation_turn or (add_generation_prompt and (not roles or roles[-1] != "assistant")):
        out += f"\n{IM_START}assistant\n"
    return out, spans


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Render a conversation in ChatML; see :func:`render_chat_with_spans`."""
    return render_chat_with_spans(messages, add_generation_prompt)[0]
