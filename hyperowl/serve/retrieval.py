"""Retrieval on `/v1/chat/completions`: a request field `"retrieval": {"index": NAME, "k": 4}`.

The last user message is the query: its text is the question, its image (at most one) the query
picture. The top-k items of the index named NAME (`hyperowl serve --rag-index NAME=DIR`) replace that
message with the layout of `hyperowl.processing.retrieval.rag_prompt` (the items' pictures travel as
data URIs, so the usual media limits apply), and the answer comes back with
`choices[0].message.citations` (the items it cites as "picture N") and a top-level `retrieved`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from hyperowl.processing.processor import MEDIA_PATTERN
from hyperowl.processing.retrieval import PromptItem, rag_prompt
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.rag.ask import cite
from hyperowl.rag.index import RagIndex, Retrieved
from hyperowl.serve.errors import ApiError
from hyperowl.serve.media import load_checked_image, resolve_media
from hyperowl.serve.schema import ChatCompletionRequest, ChatMessage, ImageUrlPart, TextPart
from hyperowl.serve.settings import ServerSettings


def _data_uri(path: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _parts(prompt: str, retrieved: list[Retrieved], query_url: str | None) -> list[dict[str, Any]]:
    """`prompt` split at its placeholders into OpenAI content parts, pictures in placeholder order."""
    urls = iter([_data_uri(r.image or r.video) for r in retrieved if r.media] + ([query_url] if query_url else []))
    parts: list[dict[str, Any]] = []
    for piece in re.split(f"({MEDIA_PATTERN.pattern})", prompt):
        if piece == IMAGE_TOKEN:
            parts.append({"type": "image_url", "image_url": {"url": next(urls)}})
        elif piece == VIDEO_TOKEN:
            parts.append({"type": "video_url", "video_url": {"url": next(urls)}})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


async def apply_retrieval(
    request: ChatCompletionRequest, indexes: Mapping[str, RagIndex], settings: ServerSettings
) -> tuple[ChatCompletionRequest, list[Retrieved]]:
    """`request` with its last user message replaced by the retrieval prompt, and the retrieved items."""
    spec = request.retrieval
    if spec.index not in indexes:
        known = ", ".join(sorted(indexes)) or "none (start the server with --rag-index NAME=DIR)"
        raise ApiError(400, f"unknown retrieval index {spec.index!r}; this server has {known}", param="retrieval.index", code="unknown_index")
    if request.stream:
        raise ApiError(400, "retrieval answers are not streamed; send the request without stream", param="stream")
    last = request.messages[-1]
    if last.role != "user":
        raise ApiError(400, "with retrieval the last message must be the user's question", param="messages")
    parts = [TextPart(type="text", text=last.content)] if isinstance(last.content, str) else list(last.content)
    images = [p for p in parts if isinstance(p, ImageUrlPart)]
    if len(images) > 1 or len(images) + sum(isinstance(p, TextPart) for p in parts) != len(parts):
        raise ApiError(400, "with retrieval the question takes at most one image (the query picture) and no video", param="messages")
    question = "".join(p.text for p in parts if isinstance(p, TextPart)).strip()
    query_url = images[0].image_url.url if images else None
    query = None
    if query_url is not None:
        source = await resolve_media(query_url, settings)
        query = await run_in_threadpool(load_checked_image, source, 0, settings)
    retrieved = await run_in_threadpool(indexes[spec.index].search, query, question, spec.k)
    prompt = rag_prompt([PromptItem(r.text, r.media) for r in retrieved], question, "image" if query_url else "")
    message = ChatMessage(role="user", content=_parts(prompt, retrieved, query_url))
    return request.model_copy(update={"messages": [*request.messages[:-1], message]}), retrieved


def add_citations(body: dict[str, Any], retrieved: list[Retrieved]) -> dict[str, Any]:
    """A `chat.completion` body with `choices[0].message.citations` and top-level `retrieved`."""
    message = body["choices"][0]["message"]
    message["citations"] = [c.as_dict() for c in cite(message["content"], retrieved)]
    body["retrieved"] = [{"picture": n, **r.as_dict()} for n, r in enumerate(retrieved, 1)]
    return body
